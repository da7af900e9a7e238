//! Domain enums (run status, test outcome, runner kind) with their text names, used in the
//! database, in JSON and on the command line, and their mapping to the wire enums.

use crate::pb;

/// An enum with one text spelling everywhere: `as_str`, `Display`, `FromStr` (an unknown text
/// names the known ones) and serde all use the same words, as the database, the command line
/// and the logs do.
#[macro_export]
macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident, $what:literal, { $($(#[$vm:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "unknown {} '{}' (one of: {})",
                        $what,
                        s,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl $crate::__serde::Serialize for $name {
            fn serialize<S: $crate::__serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> $crate::__serde::Deserialize<'de> for $name {
            fn deserialize<D: $crate::__serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <String as $crate::__serde::Deserialize>::deserialize(d)?;
                text.parse().map_err($crate::__serde::de::Error::custom)
            }
        }
    };
}

/// A [`text_enum!`] that also maps to a wire enum.
macro_rules! named_enum {
    ($name:ident, $pb:ty, $what:literal, { $($variant:ident => ($text:literal, $wire:ident)),+ $(,)? }) => {
        text_enum!($name, $what, { $($variant => $text),+ });

        impl $name {
            pub fn to_wire(self) -> i32 {
                match self { $($name::$variant => <$pb>::$wire as i32),+ }
            }

            /// The domain value of a wire enum; `None` for unspecified or unknown values.
            pub fn from_wire(v: i32) -> Option<Self> {
                match <$pb>::try_from(v).ok()? {
                    $(<$pb>::$wire => Some($name::$variant),)+
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        }
    };
}

named_enum!(RunStatus, pb::RunStatus, "run status", {
    Queued => ("queued", Queued),
    Running => ("running", Running),
    Passed => ("passed", Passed),
    Failed => ("failed", Failed),
    Cancelled => ("cancelled", Cancelled),
    Errored => ("errored", Errored),
});

impl RunStatus {
    /// Terminal statuses never change again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

named_enum!(Outcome, pb::Outcome, "outcome", {
    Passed => ("passed", Passed),
    Failed => ("failed", Failed),
    Skipped => ("skipped", Skipped),
    Flaky => ("flaky", Flaky),
    TimedOut => ("timed_out", TimedOut),
    InfraError => ("infra_error", InfraError),
});

impl Outcome {
    /// Whether this outcome lets the gate pass (flaky does under the default policy).
    pub fn is_green(self) -> bool {
        matches!(self, Outcome::Passed | Outcome::Skipped | Outcome::Flaky)
    }
}

named_enum!(RunnerKind, pb::RunnerKind, "runner kind", {
    Exec => ("exec", Exec),
    Pytest => ("pytest", Pytest),
    Junit => ("junit", Junit),
    Nextest => ("nextest", Nextest),
    CargoTest => ("cargo-test", CargoTest),
    GoTest => ("go-test", GoTest),
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_wire_values_round_trip() {
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>().unwrap(), *o);
            assert_eq!(Outcome::from_wire(o.to_wire()), Some(*o));
        }
        for s in RunStatus::ALL {
            assert_eq!(s.as_str().parse::<RunStatus>().unwrap(), *s);
            assert_eq!(RunStatus::from_wire(s.to_wire()), Some(*s));
        }
        assert_eq!(Outcome::from_wire(0), None);
        assert_eq!(Outcome::from_wire(99), None);
        assert!("bogus".parse::<Outcome>().is_err());
    }
}

//! Starts the coordinator: opens the store, spawns the scheduler actor and serves gRPC (with
//! health and reflection) and HTTP on listeners the caller bound, until `shutdown` completes.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use shardgate_common::pb;
use tokio::net::TcpListener;
use tracing::info;

use crate::actor;
use crate::auth::{Auth, AuthLayer};
use crate::core::Core;
use crate::model::{CoreConfig, Now};
use crate::read::{ReadConfig, ReadSide};
use crate::service::Services;
use crate::store::{Reads, SqliteReader, SqliteStore, Store, StoreError, postgres};

/// Largest gRPC message accepted, so a whole large suite fits in one `SubmitRun`.
pub use shardgate_common::limits::MAX_MESSAGE_BYTES;

/// Reads served at once by the read side, each on a low-priority thread with its own
/// connection.
const READ_CONCURRENCY: usize = 2;

#[derive(Debug, Clone)]
pub struct Config {
    pub db: PathBuf,
    pub core: CoreConfig,
    /// How often leases are checked.
    pub tick: Duration,
    /// The rollout hooks; none by default (runs may not ask for a rollout then).
    pub rollout: crate::rollout::RolloutConfig,
    /// Credentials; none by default, which is allowed on loopback addresses only.
    pub auth: Auth,
    /// Serve without credentials on addresses other than loopback.
    pub insecure_no_auth: bool,
    /// TLS on both ports; none by default.
    pub tls: Option<ServerTls>,
    /// The cap on open gRPC connections and their idle timeout.
    pub connections: crate::conn::ConnLimits,
    /// Events the coordinator's event stream holds for its slowest watcher; one that falls
    /// further behind gets a fresh snapshot instead.
    pub event_buffer: usize,
    /// Where other machines reach this coordinator's gRPC and HTTP ports; a PostgreSQL store
    /// records them with the lead, so that standbys can send callers to the leader.
    pub advertise: (String, String),
    /// How long a worker whose connection closed has to call again before its attempts end
    /// (its process died); `None` leaves it to the lease (workers behind a proxy that shares
    /// connections).
    pub disconnect_grace: Option<Duration>,
    /// An OTLP/gRPC collector that gets a trace of every run (see [`crate::otlp`]); none by
    /// default.
    pub otlp: Option<crate::otlp::OtlpConfig>,
}

/// The coordinator's TLS: its certificate chain and key (PEM), and for mTLS the CA workers'
/// certificates must chain to.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    fn read(what: &str, path: &PathBuf) -> Result<Vec<u8>, ServeError> {
        std::fs::read(path)
            .map_err(|e| ServeError::Tls(format!("failed to read {what} '{}': {e}", path.display())))
    }

    /// The HTTP side: server TLS only (dashboards and scripts present no certificate).
    fn http(&self) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(&Self::read("--tls-cert", &self.cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ServeError::Tls(format!("--tls-cert '{}': {e}", self.cert.display())))?;
        let key = PrivateKeyDer::from_pem_slice(&Self::read("--tls-key", &self.key)?)
            .map_err(|e| ServeError::Tls(format!("--tls-key '{}': {e}", self.key.display())))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg)))
    }

    /// The gRPC side: client certificates are asked for when a client CA is set, and required
    /// of workers by the auth layer (other clients may have none).
    fn grpc(&self) -> Result<tonic::transport::ServerTlsConfig, ServeError> {
        let identity = tonic::transport::Identity::from_pem(
            Self::read("--tls-cert", &self.cert)?,
            Self::read("--tls-key", &self.key)?,
        );
        let mut cfg = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            cfg = cfg
                .client_ca_root(tonic::transport::Certificate::from_pem(Self::read(
                    "--client-ca",
                    ca,
                )?))
                .client_auth_optional(true);
        }
        Ok(cfg)
    }
}

impl Config {
    pub fn new(db: PathBuf) -> Self {
        Self {
            db,
            core: CoreConfig::default(),
            tick: Duration::from_millis(250),
            rollout: Default::default(),
            auth: Auth::open(),
            insecure_no_auth: false,
            tls: None,
            connections: Default::default(),
            event_buffer: actor::EVENT_BUFFER,
            advertise: (String::new(), String::new()),
            disconnect_grace: Some(Duration::from_secs(1)),
            otlp: None,
        }
    }

    /// Safe by default: without credentials, anyone who reaches the port can forge a green
    /// gate, so only loopback addresses are served unless `insecure_no_auth` says otherwise.
    pub fn check_exposure(&self, addrs: &[std::net::SocketAddr]) -> Result<(), ServeError> {
        if self.auth.enabled() {
            return Ok(());
        }
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            if !self.insecure_no_auth {
                return Err(ServeError::Exposed(*a));
            }
            tracing::warn!(addr = %a, "serving WITHOUT CREDENTIALS on a non-loopback address (--insecure-no-auth): anyone who reaches it can submit, report results and start rollouts");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error(
        "refusing to serve {0} without credentials: anyone who reaches it could forge a green gate; give --tokens FILE (see `shardgate token new`), or --insecure-no-auth to accept that"
    )]
    Exposed(std::net::SocketAddr),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to load the store: {0}")]
    Load(#[from] shardgate_common::Error),
    #[error("failed to serve gRPC: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("failed to serve HTTP: {0}")]
    Http(#[from] std::io::Error),
    #[error("failed to build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A coordinator whose database is open and whose state is loaded, ready to serve; or, on a
/// PostgreSQL database another coordinator leads, a standby ready to wait for the lead.
pub struct Opened {
    config: Config,
    role: Role,
}

enum Role {
    Leader {
        core: Box<Core>,
        store_reads: SharedReads,
    },
    Standby {
        leader: postgres::Leader,
    },
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("db", &self.config.db)
            .field("role", &self.role())
            .finish_non_exhaustive()
    }
}

/// Opens the database and loads the state. A SQLite file another live coordinator holds is
/// refused; a PostgreSQL database another coordinator leads makes this one a standby.
pub fn open(config: Config) -> Result<Opened, ServeError> {
    let role = match open_store(&config)? {
        Ok((store, store_reads)) => Role::Leader {
            core: Box::new(load(&config, store)?),
            store_reads,
        },
        Err(leader) => Role::Standby { leader },
    };
    Ok(Opened { config, role })
}

/// The scheduler's state, loaded from the store.
fn load(config: &Config, store: Box<dyn Store>) -> Result<Core, ServeError> {
    let mut core_config = config.core.clone();
    core_config.rollout_configured = config.rollout.is_configured();
    core_config.trace = config.otlp.is_some();
    Ok(Core::open_boxed(core_config, store, Now::real())?)
}

/// The read side, shared by every request handler.
type SharedReads = std::sync::Arc<dyn Reads + Send + Sync>;

/// A database opened for writing, with its read side.
type OpenStore = (Box<dyn Store>, SharedReads);

/// The writer and the read side of the database `config.db` names (a `postgres://` URL, or a
/// SQLite file), or the coordinator that leads a PostgreSQL database.
fn open_store(config: &Config) -> Result<Result<OpenStore, postgres::Leader>, ServeError> {
    let db = config.db.to_string_lossy();
    if postgres::is_url(&db) {
        let me = postgres::Candidate {
            grpc_addr: config.advertise.0.clone(),
            http_addr: config.advertise.1.clone(),
            exit_when_lost: true,
            ..postgres::Candidate::this_process()
        };
        let store = match postgres::PgStore::try_open(&db, &me)? {
            Ok(store) => store,
            Err(leader) => return Ok(Err(leader)),
        };
        let reads = postgres::PgReader::open(&db, READ_CONCURRENCY)?;
        return Ok(Ok((Box::new(store), std::sync::Arc::new(reads))));
    }
    let mut store = SqliteStore::open(&config.db)?;
    store.checkpoint_in_background(&config.db, Duration::from_millis(500))?;
    let reads = SqliteReader::open(&config.db, READ_CONCURRENCY)?;
    Ok(Ok((Box::new(store), std::sync::Arc::new(reads))))
}

/// The sockets a coordinator serves on, bound by its caller.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC: the workers' calls and every other service.
    pub grpc: TcpListener,
    /// HTTP: the dashboard and the JSON API. Optional: an embedded coordinator may skip it.
    pub http: Option<TcpListener>,
    /// gRPC for watchers and readers: every service but the workers', served on threads of
    /// their own at the lowest CPU priority, so that dashboards following a busy run take no
    /// turn from the workers' calls. (A connection is served by the threads that accepted it,
    /// so one port cannot keep the two apart.)
    pub watch: Option<TcpListener>,
}

impl Listeners {
    /// The gRPC port, and HTTP if given; no watch port.
    pub fn new(grpc: TcpListener, http: Option<TcpListener>) -> Self {
        Self {
            grpc,
            http,
            watch: None,
        }
    }

    fn addrs(&self) -> std::io::Result<Vec<std::net::SocketAddr>> {
        std::iter::once(&self.grpc)
            .chain(&self.http)
            .chain(&self.watch)
            .map(TcpListener::local_addr)
            .collect()
    }
}

/// Opens and serves until `shutdown` completes. `http` is optional: an embedded coordinator may
/// skip it.
pub async fn run(
    config: Config,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_on(config, Listeners::new(grpc, http), shutdown).await
}

/// [`run`], on every socket `listeners` holds (the watch port too).
pub async fn run_on(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    open(config)?.serve_on(listeners, shutdown).await
}

impl Opened {
    /// See [`Config::check_exposure`].
    pub fn check_exposure(&self, addrs: &[std::net::SocketAddr]) -> Result<(), ServeError> {
        self.config.check_exposure(addrs)
    }

    /// `leader` or `standby`.
    pub fn role(&self) -> &'static str {
        match self.role {
            Role::Leader { .. } => "leader",
            Role::Standby { .. } => "standby",
        }
    }

    /// Serves until `shutdown` completes: as the leader, or first as a standby until this
    /// coordinator takes the lead.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        self.serve_on(Listeners::new(grpc, http), shutdown).await
    }

    /// [`Opened::serve`], on every socket `listeners` holds (the watch port too).
    pub async fn serve_on(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (down_tx, down) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = down_tx.send(true);
        });
        let Opened { config, role } = self;
        let (core, store_reads, listeners) = match role {
            Role::Leader { core, store_reads } => (*core, store_reads, listeners),
            Role::Standby { leader } => match stand_by(&config, leader, listeners, down.clone()).await? {
                Some(promoted) => promoted,
                None => return Ok(()),
            },
        };
        let read_config = ReadConfig::from(core.config());
        let handle = actor::spawn_traced(core, config.tick, config.event_buffer, config.otlp.as_ref())
            .map_err(std::io::Error::other)?;
        let reads = ReadSide::new(store_reads.clone(), handle.live(), read_config, READ_CONCURRENCY);
        tokio::spawn(crate::rollout::run(handle.clone(), config.rollout.clone()));
        let services = Services::new(handle.clone(), reads.clone(), store_reads);
        let mut down = down;
        let shutdown = async move {
            let _ = down.wait_for(|d| *d).await;
        };
        serve_all(config, handle, reads, services, listeners, shutdown).await
    }
}

/// What a standby that took the lead serves with: the state it loaded, its read side, and its
/// listening sockets.
type Promoted = (Core, SharedReads, Listeners);

/// Answers as a standby (see [`crate::standby`]) and asks for the lead every quarter of a
/// lease, until it has it (then the state is loaded and the caller serves as the leader on
/// the same sockets) or `down` says to stop (`None`).
async fn stand_by(
    config: &Config,
    leader: postgres::Leader,
    listeners: Listeners,
    mut down: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<Promoted>, ServeError> {
    info!(
        leader = %leader.holder,
        leader_grpc = %leader.grpc_addr,
        epoch = leader.epoch,
        "standing by: another coordinator leads the database"
    );
    let known = std::sync::Arc::new(std::sync::RwLock::new(leader));
    let share = |l: Option<TcpListener>| -> std::io::Result<_> {
        Ok(l.map(crate::standby::share).transpose()?.unzip())
    };
    let (grpc, grpc_standby) = crate::standby::share(listeners.grpc)?;
    let (http, http_standby) = share(listeners.http)?;
    let (watch, watch_standby) = share(listeners.watch)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (grpc_app, http_app) = crate::standby::routers(known.clone(), config.tls.is_some());
    // The watch port answers as the gRPC port does: the leader is elsewhere.
    let apps = [
        (Some(grpc_standby), grpc_app.clone()),
        (http_standby, http_app),
        (watch_standby, grpc_app),
    ];
    let mut servers = Vec::new();
    for (l, app) in apps {
        if let Some(l) = l {
            servers.push(spawn_http(
                l,
                app,
                stop_rx.clone(),
                config.tls.clone(),
                config.connections,
            )?);
        }
    }
    let every = postgres::Candidate::this_process().lease / 4;
    let promoted = loop {
        tokio::select! {
            _ = down.wait_for(|d| *d) => break None,
            _ = tokio::time::sleep(every) => {}
        }
        let cfg = config.clone();
        let opened = tokio::task::spawn_blocking(move || {
            Ok::<_, ServeError>(match open_store(&cfg)? {
                Ok((store, reads)) => Ok((load(&cfg, store)?, reads)),
                Err(leader) => Err(leader),
            })
        })
        .await
        .map_err(std::io::Error::other)?;
        match opened {
            Ok(Ok((core, reads))) => break Some((core, reads)),
            Ok(Err(leader)) => *known.write().unwrap_or_else(|p| p.into_inner()) = leader,
            // The database is out of reach: keep standing by and ask again.
            Err(e) => tracing::warn!(error = %e, "a standby failed to ask for the lead"),
        }
    };
    let _ = stop_tx.send(true);
    for s in servers {
        // The standby stops accepting at once; connections it still holds get a moment.
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    Ok(promoted.map(|(core, reads)| {
        info!("took the lead: serving as the leader");
        (core, reads, Listeners { grpc, http, watch })
    }))
}

/// One gRPC port's standard health service: every shardgate service the port serves (the
/// workers' too when `workers`), serving until [`set_health`] says otherwise.
async fn health(
    workers: bool,
) -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    set_health(&reporter, workers, tonic_health::ServingStatus::Serving).await;
    (reporter, service)
}

/// What a port's health reports on: the whole server ("") and each shardgate service it serves.
fn health_names(workers: bool) -> Vec<&'static str> {
    use tonic::server::NamedService;
    let mut names = vec![
        "",
        <pb::run_service_server::RunServiceServer<Services> as NamedService>::NAME,
        <pb::dashboard_service_server::DashboardServiceServer<Services> as NamedService>::NAME,
        <pb::gate_service_server::GateServiceServer<Services> as NamedService>::NAME,
    ];
    if workers {
        names.push(<pb::worker_service_server::WorkerServiceServer<Services> as NamedService>::NAME);
    }
    names
}

async fn set_health(
    reporter: &tonic_health::server::HealthReporter,
    workers: bool,
    status: tonic_health::ServingStatus,
) {
    for name in health_names(workers) {
        reporter.set_service_status(name, status).await;
    }
}

/// NOT_SERVING, then every health watch ends (each has seen NOT_SERVING first): a server
/// stopping gracefully waits for open calls, and a load balancer's health watch would hold it
/// for good. A check after that finds no status: the server is going away.
async fn stop_health(mut reporter: tonic_health::server::HealthReporter, workers: bool) {
    set_health(&reporter, workers, tonic_health::ServingStatus::NotServing).await;
    for name in health_names(workers) {
        reporter.clear_service_status(name).await;
    }
}

/// gRPC reflection, v1 and v1alpha (Python's grpcio-reflection speaks only the latter).
fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    Ok((reflection_v1, reflection_v1alpha))
}

/// The gRPC server's settings: keep-alive pings and TLS.
fn grpc_builder(config: &Config) -> Result<tonic::transport::Server, ServeError> {
    // Pings keep a healthy idle connection moving (so the idle timeout spares it) and find a
    // peer that vanished.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.connections.idle / 3))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls.grpc()?)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    Ok(builder)
}

/// The gRPC services one port serves, behind the auth layer: every service, or without the
/// workers' (`workers: false`, the watch port). `WatchRun`'s watches run on `watches`.
fn grpc_router<H, R1, R2>(
    config: &Config,
    services: &Services,
    (health, reflection_v1, reflection_v1alpha): (
        tonic_health::pb::health_server::HealthServer<H>,
        tonic_reflection::server::v1::ServerReflectionServer<R1>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<R2>,
    ),
    watches: tokio::runtime::Handle,
    workers: bool,
) -> Result<GrpcRouter, ServeError>
where
    H: tonic_health::pb::health_server::Health,
    R1: tonic_reflection::server::v1::ServerReflection,
    R2: tonic_reflection::server::v1alpha::ServerReflection,
{
    let require_worker_certs = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    let router = grpc_builder(config)?
        .layer(AuthLayer::new(config.auth.clone()).require_worker_certs(require_worker_certs))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(crate::watch_grpc::RunServiceWithWatch::new(
            pb::run_service_server::RunServiceServer::new(services.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            services.clone(),
            watches,
        ))
        .add_service(pb::dashboard_service_server::DashboardServiceServer::new(
            services.clone(),
        ))
        .add_service(pb::gate_service_server::GateServiceServer::new(services.clone()));
    Ok(if workers {
        router.add_service(
            pb::worker_service_server::WorkerServiceServer::new(services.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
    } else {
        router.add_service(crate::watch_grpc::NoWorkersHere)
    })
}

type GrpcRouter =
    tonic::transport::server::Router<tower::layer::util::Stack<AuthLayer, tower::layer::util::Identity>>;

async fn serve_all(
    config: Config,
    handle: actor::Handle,
    reads: ReadSide,
    services: Services,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.check_exposure(&listeners.addrs()?)?;
    let Listeners { grpc, http, watch } = listeners;
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    // Each gRPC port has its own health: the watch port does not serve the workers' service.
    let (health_reporter, health_service) = health(true).await;
    let (watch_health_reporter, watch_health_service) = health(false).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let closing = handle.clone();
    let handle_for_traces = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        // Not serving from the first moment of the drain: load balancers stop sending.
        stop_health(health_reporter, true).await;
        stop_health(watch_health_reporter, false).await;
        // Watches and long polls end now (their callers follow the coordinator to its next
        // start), or the servers would wait for them: a watch until its run ends.
        closing.begin_shutdown();
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    info!(grpc = %grpc.local_addr()?, db = %config.db.display(), "coordinator serving");
    let http_task = match http {
        Some(listener) => {
            info!(http = %listener.local_addr()?, "http serving");
            let app = crate::http::router(handle.clone(), reads, stop_rx.clone())
                .layer(axum::middleware::from_fn_with_state(
                    config.auth.clone(),
                    crate::auth::http_layer,
                ))
                // Outermost: a gRPC call on this port is answered in gRPC, before any auth.
                .layer(axum::middleware::from_fn(crate::http::refuse_grpc));
            Some(spawn_http(
                listener,
                app,
                stop_rx.clone(),
                config.tls.clone(),
                config.connections,
            )?)
        }
        None => None,
    };

    // A worker whose connection closes and that does not call again within the grace lost
    // its process: its attempts end then, not at the end of the lease.
    let disconnects = config
        .disconnect_grace
        .map(|grace| crate::liveness::spawn(handle.clone(), services.peers(), grace));
    let watches = WatchThreads::start()?;
    let router = |health, workers: bool| {
        grpc_router(
            &config,
            &services,
            (health, reflection_v1.clone(), reflection_v1alpha.clone()),
            watches.handle(),
            workers,
        )
    };
    // The watch port: its connections, and so every byte written to its watchers, are served
    // on the watch threads.
    let watch_task = match watch {
        Some(listener) => {
            info!(watch = %listener.local_addr()?, "gRPC watch port serving");
            let router = router(watch_health_service, false)?;
            let listener = listener.into_std()?;
            let (limits, stop) = (config.connections, stopped(stop_rx.clone()));
            Some(watches.handle().spawn(async move {
                let listener = TcpListener::from_std(listener)?;
                router
                    .serve_with_incoming_shutdown(crate::conn::incoming(listener, limits, None), stop)
                    .await
                    .map_err(ServeError::from)
            }))
        }
        None => None,
    };
    router(health_service, true)?
        .serve_with_incoming_shutdown(
            crate::conn::incoming(grpc, config.connections, disconnects),
            stopped(stop_rx),
        )
        .await?;
    if let Some(t) = watch_task {
        t.await.map_err(std::io::Error::other)??;
    }
    if let Some(t) = http_task {
        t.await.map_err(std::io::Error::other)??;
    }
    handle_for_traces.flush_traces(Duration::from_secs(5)).await;
    info!("coordinator stopped");
    Ok(())
}

/// The threads gRPC watches run on (`watch_grpc.rs`): a runtime of their own at the lowest
/// CPU priority, so that following a busy run for a hundred dashboards takes no turn from the
/// workers' calls. Stopped without waiting when the server ends (its tasks are watches, which
/// end with their connections).
struct WatchThreads(Option<tokio::runtime::Runtime>);

impl WatchThreads {
    fn start() -> std::io::Result<Self> {
        Ok(Self(Some(low_priority_runtime("shardgate-watch")?)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the watch threads run until dropped")
            .handle()
            .clone()
    }
}

impl Drop for WatchThreads {
    fn drop(&mut self) {
        // A runtime dropped inside another one's task must not wait for its threads.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A runtime of two threads named `name` at the lowest CPU priority, for work that must not
/// take the CPU from the workers' calls and the scheduler (HTTP, gRPC watches).
fn low_priority_runtime(name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .on_thread_start(crate::read::idle_priority)
        .enable_all()
        .build()
}

/// Serves HTTP on a runtime of its own, whose threads run at the lowest CPU priority: the
/// dashboard and the JSON API are reads, and a storm of them must not take the CPU from the
/// workers' RPCs and the scheduler.
fn spawn_http(
    listener: TcpListener,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
    tls: Option<ServerTls>,
    limits: crate::conn::ConnLimits,
) -> Result<tokio::sync::oneshot::Receiver<std::io::Result<()>>, ServeError> {
    let acceptor = tls.as_ref().map(ServerTls::http).transpose()?;
    let listener = listener.into_std()?;
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("shardgate-http".into())
        .spawn(move || {
            crate::read::idle_priority();
            let served = low_priority_runtime("shardgate-http").and_then(|rt| {
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    let listener = crate::conn::HttpListener::new(listener, limits, acceptor)?;
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop.wait_for(|s| *s).await;
                        })
                        .await
                })
            });
            let _ = done.send(served);
        })?;
    Ok(result)
}

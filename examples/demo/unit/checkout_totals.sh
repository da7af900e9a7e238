#!/bin/sh
# demo test: unit/checkout_totals.sh (about 0.21s)
echo "running unit/checkout_totals"
sleep 0.21
if [ "${SHARDGATE_DEMO_FAIL:-0}" = "1" ]; then
  echo "expected total 42.00, got 41.99" >&2
  exit 1
fi
echo "ok"

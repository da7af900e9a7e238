#!/bin/sh
# demo test: unit/session_expiry.sh (about 0.07s)
echo "running unit/session_expiry"
sleep 0.07
echo "ok"

#!/bin/sh
# demo test: unit/avatar_upload_limits.sh (about 0.18s)
echo "running unit/avatar_upload_limits"
sleep 0.18
echo "ok"

#!/bin/sh
# demo test: unit/friend_request_dedupe.sh (about 0.06s)
echo "running unit/friend_request_dedupe"
sleep 0.06
echo "ok"

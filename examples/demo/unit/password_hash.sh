#!/bin/sh
# demo test: unit/password_hash.sh (about 0.16s)
echo "running unit/password_hash"
sleep 0.16
echo "ok"

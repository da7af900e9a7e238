#!/bin/sh
# demo test: unit/login_rate_limit.sh (about 0.06s)
echo "running unit/login_rate_limit"
sleep 0.06
echo "ok"

#!/bin/sh
# demo test: browser/checkout_flow.sh (about 1.6s)
echo "running browser/checkout_flow"
sleep 1.6
echo "ok"

#!/bin/sh
# demo test: browser/signup_flow.sh (about 1.87s)
echo "running browser/signup_flow"
sleep 1.87
echo "ok"

#!/bin/sh
# demo test: unit/currency_rounding.sh (about 0.07s)
echo "running unit/currency_rounding"
sleep 0.07
echo "ok"

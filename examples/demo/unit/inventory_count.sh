#!/bin/sh
# demo test: unit/inventory_count.sh (about 0.18s)
echo "running unit/inventory_count"
sleep 0.18
echo "ok"

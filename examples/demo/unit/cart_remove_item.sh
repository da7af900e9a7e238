#!/bin/sh
# demo test: unit/cart_remove_item.sh (about 0.09s)
echo "running unit/cart_remove_item"
sleep 0.09
echo "ok"

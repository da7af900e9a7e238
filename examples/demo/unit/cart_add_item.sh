#!/bin/sh
# demo test: unit/cart_add_item.sh (about 0.13s)
echo "running unit/cart_add_item"
sleep 0.13
echo "ok"

#!/bin/sh
# demo test: unit/shop_discount_codes.sh (about 0.07s)
echo "running unit/shop_discount_codes"
sleep 0.07
echo "ok"

#!/bin/sh
# demo test: browser/room_join_flow.sh (about 2.46s)
echo "running browser/room_join_flow"
sleep 2.46
echo "ok"

#!/bin/sh
# demo test: integration/friend_graph_sync.sh (about 1.16s)
echo "running integration/friend_graph_sync"
sleep 1.16
echo "ok"

#!/bin/sh
# demo test: integration/search_index_refresh.sh (about 0.58s)
echo "running integration/search_index_refresh"
sleep 0.58
echo "ok"

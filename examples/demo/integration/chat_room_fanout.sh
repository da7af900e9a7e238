#!/bin/sh
# demo test: integration/chat_room_fanout.sh (about 1.06s)
echo "running integration/chat_room_fanout"
sleep 1.06
echo "ok"

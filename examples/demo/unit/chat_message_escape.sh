#!/bin/sh
# demo test: unit/chat_message_escape.sh (about 0.14s)
echo "running unit/chat_message_escape"
sleep 0.14
echo "ok"

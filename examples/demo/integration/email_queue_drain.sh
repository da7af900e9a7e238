#!/bin/sh
# demo test: integration/email_queue_drain.sh (about 0.9s)
echo "running integration/email_queue_drain"
sleep 0.9
echo "ok"

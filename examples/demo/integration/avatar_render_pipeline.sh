#!/bin/sh
# demo test: integration/avatar_render_pipeline.sh (about 0.5s)
echo "running integration/avatar_render_pipeline"
sleep 0.5
echo "ok"

#!/usr/bin/env bash
# Session 16, device call 12: build, then the whole CUDA suite at the session's final code, dealt
# by test into 8 processes (gpu_stages.sh xtests, new this session).
o=/tmp/c
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-540} build "xtests:420:8"

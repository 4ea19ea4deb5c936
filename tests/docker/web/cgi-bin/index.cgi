#!/bin/sh
# Answers `HOSTNAME ADDR:PORT`, the format of the echo protocol the other
# tests parse, so a test sees which container served it and which client
# address reached it. httpd listens on a dual-stack socket and reports IPv4
# peers as [::ffff:a.b.c.d]; plain a.b.c.d is what the tests compare with.
addr=$REMOTE_ADDR
case $addr in
"[::ffff:"*) addr=${addr#"[::ffff:"}; addr=${addr%"]"} ;;
esac
printf 'Content-Type: text/plain\r\n\r\n%s %s:%s\n' "$(hostname)" "$addr" "$REMOTE_PORT"

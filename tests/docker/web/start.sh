#!/bin/sh
# PID 1 of the container. The trap matters: the kernel drops SIGTERM for a
# namespace's init unless it has a handler, so without it every `docker stop`
# (and every dockerd shutdown) would wait for the kill timeout.
trap 'kill $nc $httpd $echo $http 2>/dev/null; exit 0' TERM INT
nc -ll -p 7 -e /whoami.sh &
nc=$!
httpd -f -p 80 -h /www &
httpd=$!
/bin/lb-echo --name "$(hostname)" --udp 0.0.0.0:5353 --tcp 0.0.0.0:9000 &
echo=$!
/bin/lb-http --name "$(hostname)" --listen 0.0.0.0:8000 &
http=$!
wait

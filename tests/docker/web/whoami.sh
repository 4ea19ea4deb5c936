#!/bin/sh
# TCP port 7: read one line, answer with the container's hostname.
read -r _
hostname

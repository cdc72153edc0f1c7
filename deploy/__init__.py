"""Deployment files (nginx.conf, systemd unit, Procfile) and the local cluster."""

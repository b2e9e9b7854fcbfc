"""etcdproxy: a multi-process etcd v3 gRPC proxy, a drop-in for ``etcd grpc-proxy start``."""

__version__ = "0.1.0"

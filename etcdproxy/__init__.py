"""etcdproxy: a multi-process etcd v3 gRPC proxy, a drop-in for ``etcd grpc-proxy start``."""

__version__ = "0.1.0"
# The etcd v3 API the proxy serves (its protos are etcd v3.7.1's); printed by --version.
ETCD_API_VERSION = "3.7"

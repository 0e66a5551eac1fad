import contextlib
import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

# Triton reads this once, at import: without a GPU its kernels can only run interpreted. With
# one they compile, which the gpu-marked tests check (benchmarks/gpu_check.sh unsets the variable).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip gpu-marked tests on hosts without CUDA: collected, so `-m gpu` lists what it skips."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu-marked: needs a CUDA device (benchmarks/gpu_check.sh)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def _postgres_url() -> str | None:
    return os.environ.get("HYBRIDLAB_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path: Path):
    """A fresh, empty database of each kind (PostgreSQL where .ci/run started one)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
        return
    base = _postgres_url()
    if base is None:
        pytest.skip("HYBRIDLAB_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL)")
    name = f"hl_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


class PrivatePostgres:
    """A throwaway PostgreSQL server of this test alone (the recipe of .ci/postgres.sh), which a
    test may restart or stop without disturbing the shared one."""

    # pg_ctl waits up to 60 s by default; a busy CI machine can need longer to shut down.
    WAIT_S = 300

    def __init__(self) -> None:
        import glob
        import shutil
        import socket
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                      key=lambda p: int(p.split("/")[-2]))
        if not bins or os.geteuid() != 0 or shutil.which("su") is None:
            pytest.skip("needs PostgreSQL binaries and root (to run them as the postgres user)")
        self.bin = bins[-1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        # Under /tmp, not tmp_path: the postgres user must reach it.
        self.data = tempfile.mkdtemp(prefix="hybridlab-pg-private.")
        shutil.chown(self.data, "postgres", "postgres")
        self._as_postgres(f"{self.bin}/initdb -D {self.data} --auth=trust -U postgres")
        self.start()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, command: str) -> None:
        import subprocess
        import tempfile

        # A file, not a pipe: the server that pg_ctl starts inherits the handle, and a pipe would
        # keep this call waiting until the server exits.
        with tempfile.TemporaryFile(mode="w+") as said:
            done = subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", command],
                                  stdout=said, stderr=subprocess.STDOUT)
            said.seek(0)
            message = said.read()
        if done.returncode:
            log = Path(self.data, "server.log")
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no server log)"
            raise RuntimeError(f"{command!r} exited {done.returncode}: {message}"
                               f"\n--- server.log (end) ---\n{tail}")

    def start(self) -> None:
        # fsync off: a throwaway server, and its shutdown checkpoints stay quick on a slow disk.
        self._as_postgres(
            f"{self.bin}/pg_ctl -D {self.data} -w -t {self.WAIT_S} -l {self.data}/server.log "
            f"-o '-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 "
            f"-c max_connections=200 -c fsync=off' start")

    def stop(self) -> None:
        self._as_postgres(f"{self.bin}/pg_ctl -D {self.data} -w -t {self.WAIT_S} -m fast stop")

    def restart(self) -> None:
        self._as_postgres(f"{self.bin}/pg_ctl -D {self.data} -w -t {self.WAIT_S} -m fast restart")

    def running(self) -> bool:
        return Path(self.data, "postmaster.pid").exists()

    def close(self) -> None:
        import shutil

        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def private_postgres():
    server = PrivatePostgres()
    yield server
    server.close()

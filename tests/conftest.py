import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

# Triton reads this once, at import: without a GPU its kernels can only run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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

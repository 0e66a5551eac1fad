"""The study database: URLs, engines, hybridlab's tables and queries, study and trial lookup.

Search, evaluation, export and the dashboard all import this package; it imports none of them.
"""

from hybridlab.store.engine import (
    SQLITE_BUSY_TIMEOUT_S,
    StorageError,
    check_storage,
    create_tables,
    creation_lock,
    default_sqlite_url,
    display_url,
    engine_kwargs,
    is_sqlite,
    make_engine,
    open_engine,
    readonly_engine_kwargs,
    readonly_url,
    require_database,
    session_scope,
    sqlite_path,
    transaction,
    worker_id,
)
from hybridlab.store.models import (
    CHECKPOINT_KIND,
    NOTED,
    SCHEMA_VERSION,
    WITH_WEIGHTS,
    Artifact,
    Base,
    CalibrationRun,
    Candidate,
    CandidateStatus,
    CurvePoint,
    Evaluation,
    GenomeClaim,
    Promotion,
    PromotionRole,
    PromotionStatus,
    Run,
    SchemaVersion,
    Slot,
)
from hybridlab.store.retry import RetryingRDBStorage, is_transient, retrying
from hybridlab.store.studies import (
    TrialWeights,
    best_trials,
    home_study,
    is_rung_study,
    load_study,
    optuna_storage,
    resolve_study,
    rung_study_name,
    set_trial_user_attrs,
    study_names,
    top_trials,
    trial_weights,
)

__all__ = [
    "CHECKPOINT_KIND", "NOTED", "SCHEMA_VERSION", "SQLITE_BUSY_TIMEOUT_S", "WITH_WEIGHTS",
    "Artifact", "Base", "CalibrationRun", "Candidate", "CandidateStatus", "CurvePoint",
    "Evaluation", "GenomeClaim",
    "Promotion", "PromotionRole", "PromotionStatus", "RetryingRDBStorage", "Run", "SchemaVersion",
    "Slot", "StorageError",
    "TrialWeights", "best_trials", "check_storage", "create_tables", "creation_lock",
    "default_sqlite_url", "display_url", "engine_kwargs", "home_study", "is_rung_study",
    "is_sqlite",
    "is_transient",
    "load_study", "make_engine", "open_engine", "optuna_storage", "readonly_engine_kwargs",
    "readonly_url", "require_database", "resolve_study", "retrying", "rung_study_name",
    "session_scope",
    "set_trial_user_attrs", "sqlite_path", "study_names", "top_trials", "transaction",
    "trial_weights", "worker_id",
]

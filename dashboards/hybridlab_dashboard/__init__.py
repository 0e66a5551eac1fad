"""hybridlab's dashboard: a study's architectures, fronts and curves, with Optuna's views beside.

Read-only and served from the study database alone; ``hybridlab dashboard`` runs it.
"""

from hybridlab_dashboard.app import DashboardApp
from hybridlab_dashboard.data import StudyDatabase, resolve_storage
from hybridlab_dashboard.server import (
    add_dashboard_arguments,
    dashboard_command,
    make_dashboard_server,
)

__all__ = [
    "DashboardApp",
    "StudyDatabase",
    "add_dashboard_arguments",
    "dashboard_command",
    "make_dashboard_server",
    "resolve_storage",
]

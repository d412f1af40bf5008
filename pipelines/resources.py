"""Resources shared by every asset: where data lives, and where MLflow tracks runs."""

import dagster as dg

from recsys.storage import Storage


class StorageResource(dg.ConfigurableResource):
    """The data root: a local folder (default `data`, relative to where Dagster runs) or any
    fsspec URI such as `s3://bucket/recsys`. Every path an asset touches comes from here."""

    root: str = "data"
    #: check at each step's start that the root exists and answers (distributed runs: a
    #: worker without the shared volume fails at once instead of writing to its own disk)
    require_reachable: bool = False

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.require_reachable:
            try:
                Storage(self.root).check_reachable()
            except OSError as exc:
                raise dg.Failure(str(exc)) from exc

    def storage(self) -> Storage:
        return Storage(self.root)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking. Unset `tracking_uri` means the SQLite store under the data root."""

    tracking_uri: str | None = None
    registry_uri: str | None = None

    def resolve_tracking_uri(self, storage: Storage) -> str:
        return self.tracking_uri or storage.mlflow_uri()

    def artifact_root(self, storage: Storage) -> str | None:
        """Where new experiments keep their artifacts: beside the data root for a local store
        (SQLite, files; MLflow's default would be ./mlruns in the process's working
        directory), None for a tracking server (it decides)."""
        uri = self.resolve_tracking_uri(storage)
        remote = uri.startswith(("http://", "https://", "databricks"))
        return None if remote else storage.mlflow_artifacts()


class IngestPolicy(dg.ConfigurableResource):
    """Thresholds of the ingest asset checks."""

    max_reject_rate: float = 0.05
    freshness_hours: float = 48.0

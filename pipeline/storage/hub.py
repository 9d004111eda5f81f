"""Upload a finished variant to a Hugging Face Hub model repo (``huggingface_hub``).

The store stays the source of truth; the Hub gets a copy of one verified version, its manifest
included, in one commit whose message names the version and the manifest's sha256. Credentials
are huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``); ``HF_ENDPOINT`` points it at a
private Hub.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import IntegrityError, StorageError
from pipeline.hashing import digest_bytes
from pipeline.storage.base import Storage
from pipeline.storage.refs import Ref


def push(storage: Storage, ref: Ref, repo_id: str, *, private: bool = True, revision: str | None = None) -> dict[str, Any]:
    """Upload the version ``ref`` names to ``repo_id`` (created if missing).

    Raises:
        IntegrityError: the stored files do not match their manifest (nothing is uploaded).
        StorageError: the Hub is unreachable, offline mode is on, or the token is refused.
    """
    from pipeline.storage.consume import pull
    from pipeline.storage.manifest import verify_folder
    from pipeline.storage.registry import resolve

    version, manifest, raw = resolve(storage, ref)
    rel = f"{ref.model}/{ref.variant}/{version}"
    scratch = None
    folder = storage.local_path(rel)
    try:
        if folder is None:  # a remote store: a checked pull into a scratch folder
            scratch = Path(tempfile.mkdtemp(prefix="modelbuild-hub-"))
            folder = Path(pull(storage, Ref(ref.model, ref.variant, version), scratch / "v")["path"])
        problems = verify_folder(folder)
        if problems:
            raise IntegrityError(f"{rel} does not match its manifest ({problems[0]}); not uploaded",
                                 fix="republish the variant")
        return _upload(folder, repo_id, private=private, revision=revision,
                       message=f"{rel} (modelbuild)", description=f"manifest sha256 {digest_bytes(raw)}")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, message: str,
            description: str) -> dict[str, Any]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message,
                                 commit_description=description, revision=revision)
    except OfflineModeIsEnabled:
        raise StorageError(f"cannot upload to {repo_id}: HF_HUB_OFFLINE is set", where="hub",
                           fix="unset HF_HUB_OFFLINE on a machine that reaches the Hub") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise StorageError(f"the Hub refused the token for {repo_id} (HTTP {status})", where="hub",
                               fix="set HF_TOKEN to a token with write access, or run `hf auth login`") from None
        raise StorageError(f"upload to {repo_id} failed: {str(e).splitlines()[0]}", where="hub",
                           fix="check the repo id and HF_ENDPOINT, then rerun") from None
    except Exception as e:  # noqa: BLE001 - httpx's transport errors (refused, DNS, TLS, timeouts)
        if e.__class__.__module__.startswith("httpx"):
            raise StorageError(f"the Hub is unreachable for {repo_id}: {e.__class__.__name__}: {e}", where="hub",
                               fix="check the network and HF_ENDPOINT, then rerun") from None
        raise
    return {"repo": repo_id, "commit": info.oid, "url": info.commit_url}

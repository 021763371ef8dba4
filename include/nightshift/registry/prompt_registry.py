"""Prompt templates as versions of MLflow's Prompt Registry: register, read, move the serving alias with history.

A template (prompts/template.py) is registered as a chat prompt; the version carries the SHA-256 of what decides
the rendered messages (``nightshift.prompt_sha256``) and the variables' defaults. Registering a template whose
digest a version already has returns that version, so running ``nightshift prompts register`` twice, or from two
machines at once, makes one version (both hold the prompt's lease, registry/lease.py, for the check and the write).
A version read back is checked against its digest: a template edited in the store is refused, never served.

The ``production`` alias names the version the endpoint applies; ``candidate`` (with a share in the prompt's
``nightshift.prompt_rollout`` tag) a version under a canary. A move of ``production`` is a compare-and-set
under the prompt's lease, like the champion's (registry/history.py): it happens only if the alias still names
the version the move was decided against. Every move, and every candidate the gate or a person declined, is a
tag of the prompt (``nightshift.prompt_move.<id>``, a JSON record written pending, then done), so the history
lives beside the alias; the id comes from the caller (the DAG run's task), so a retry finds its own record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from nightshift.prompts.template import PromptError, PromptTemplate
from nightshift.registry.common import mlflow_client, names_nothing
from nightshift.registry.lease import registry_lease

log = logging.getLogger(__name__)

PRODUCTION = "production"
CANDIDATE = "candidate"
DIGEST_TAG = "nightshift.prompt_sha256"
VARIABLES_TAG = "nightshift.prompt_variables"
DESCRIPTION_TAG = "nightshift.prompt_description"
BY_TAG = "nightshift.registered_by"
MOVE_TAG = "nightshift.prompt_move."
ROLLOUT_TAG = "nightshift.prompt_rollout"
NOTHING = "none"
"""As ``expected``: the move was decided when no version carried the alias, and must find none."""
MAX_REASON_CHARS = 500


class PromptConflict(RuntimeError):
    """The alias no longer names the version the move was decided against; nothing was moved."""


@dataclass(frozen=True)
class PromptVersion:
    """One registered version of a template."""

    name: str
    version: int
    template: PromptTemplate
    digest: str
    message: str = ""
    registered_by: str = ""
    created_at: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name}/v{self.version}"

    @property
    def uri(self) -> str:
        return f"prompts:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "digest": self.digest, "message": self.message,
                "registered_by": self.registered_by, "created_at": self.created_at, "aliases": list(self.aliases),
                "template": self.template.to_dict()}


@dataclass
class PromptMove:
    """One move of a prompt's alias, or a candidate that was declined (``kind: declined``, nothing moved)."""

    id: str
    alias: str
    kind: str
    """``promotion``, ``rollback``, ``declined`` (the gate or a person kept the alias where it was)."""
    from_version: int | None
    to_version: int
    by: str
    dag_run: str
    reason: str
    requested_at: str
    at: str = ""
    state: str = "pending"
    """``pending``, ``done``, ``aborted`` (a conflict: nothing moved)."""
    evaluation: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    """The SHA-256 of the target version's template when the move was decided: what the endpoint checks it against."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def move_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class _LeaseName:
    """What registry_lease needs of a registered model, for a prompt's own lease (``prompt.<name>``)."""

    def __init__(self, name: str, lease_uri: str, lease_dir) -> None:
        self.model_name = f"prompt.{name}"
        self.lease_uri = lease_uri
        self.lease_dir = lease_dir


class PromptRegistry:
    """The Prompt Registry of one installation's MLflow tracking store."""

    def __init__(self, tracking_uri: str, lease_uri: str | None = None, lease_dir=None) -> None:
        self.tracking_uri = tracking_uri
        self.lease_uri = lease_uri or tracking_uri
        self.lease_dir = lease_dir
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def lease(self, name: str, holder: str):
        return registry_lease(_LeaseName(name, self.lease_uri, self.lease_dir), holder)  # type: ignore[arg-type]

    # -- versions ---------------------------------------------------------------------------------------------

    def register(self, template: PromptTemplate, message: str, by: str) -> tuple[PromptVersion, bool]:
        """Register ``template`` unless a version has its digest; return the version and whether it is new."""
        digest = template.digest()
        with self.lease(template.name, f"register {template.name}"):
            for existing in self.versions(template.name):
                if existing.digest == digest:
                    return existing, False
            pv = self.client.register_prompt(
                template.name, template.chat_template(), commit_message=message[:MAX_REASON_CHARS] or None,
                tags={DIGEST_TAG: digest, VARIABLES_TAG: json.dumps(template.variables, sort_keys=True),
                      DESCRIPTION_TAG: template.description, BY_TAG: by[:200]})
        log.info("registered prompt %s v%s", template.name, pv.version)
        return self._version(pv), True

    def names(self) -> list[str]:
        """Return the names of every registered prompt."""
        out, token = [], None
        while True:
            page = self.client.search_prompts(max_results=1000, page_token=token)
            out += [p.name for p in page]
            token = page.token
            if not token:
                return sorted(out)

    def versions(self, name: str) -> list[PromptVersion]:
        """Return every version of a prompt, oldest first (none when the prompt does not exist)."""
        from mlflow.exceptions import MlflowException

        try:
            if self.client.get_prompt(name) is None:
                return []
            found, token = [], None
            while True:
                page = self.client.search_prompt_versions(name, max_results=1000, page_token=token)
                found += list(page)
                token = page.token
                if not token:
                    break
        except MlflowException as exc:
            if names_nothing(exc):
                return []
            raise
        # A search does not fill in aliases; the two nightshift moves are looked up by name.
        aliases: dict[int, list[str]] = {}
        for alias in (PRODUCTION, CANDIDATE):
            try:
                named = self.by_alias(name, alias)
            except PromptError:  # an alias on an altered version: that version is left out below anyway
                continue
            if named is not None:
                aliases.setdefault(named.version, []).append(alias)
        out = []
        for pv in found:
            try:
                version = self._version(pv)
            except PromptError as exc:
                # A version nightshift did not write (or one altered since) is never used, and never blocks the others.
                log.warning("prompt %s v%s is left out: %s", name, pv.version, exc)
                continue
            out.append(dataclasses.replace(version, aliases=tuple(aliases.get(version.version, ()))))
        return sorted(out, key=lambda v: v.version)

    def get(self, name: str, version: int) -> PromptVersion:
        """Return one version; LookupError when it does not exist, PromptError when its template was altered."""
        from mlflow.exceptions import MlflowException

        try:
            pv = self.client.get_prompt_version(name, int(version))
        except MlflowException as exc:
            if names_nothing(exc):
                pv = None
            else:
                raise
        if pv is None:
            raise LookupError(f"prompt {name} has no version {version}")
        return self._version(pv)

    def by_alias(self, name: str, alias: str = PRODUCTION) -> PromptVersion | None:
        """Return the version ``alias`` names, or None when no version carries it (a store that cannot be read
        raises: read as "no prompt" it would serve without one)."""
        from mlflow.exceptions import MlflowException

        try:
            pv = self.client.get_prompt_version_by_alias(name, alias)
        except MlflowException as exc:
            if names_nothing(exc):  # only the store's own "no such prompt or alias"; a proxy's 404 is an error
                return None
            raise
        return self._version(pv) if pv is not None else None

    def verified(self, version: PromptVersion) -> PromptVersion:
        """Return ``version`` when its digest is the one recorded by the move that made it the alias's target;
        PromptError otherwise. The version's own tags cannot vouch for themselves: its variables' defaults are a
        tag, and whoever rewrites them could rewrite the digest beside them; the move record is another record.
        A version no recorded move names (an alias set by hand) is refused."""
        moves = [m for m in self.history(version.name) if m.state == "done" and m.to_version == version.version
                 and m.kind in ("promotion", "rollout", "rollback", "canary") and m.digest]
        if not moves:
            raise PromptError(f"prompt {version.name} v{version.version} was never released by nightshift (no "
                              "recorded move names it): release it with evaluate_prompt")
        if moves[-1].digest != version.digest:
            raise PromptError(f"prompt {version.name} v{version.version} differs from the version that was "
                              "released (its digest changed since the move): it was altered in the store")
        return version

    def _version(self, pv) -> PromptVersion:
        tags = dict(pv.tags or {})
        name = pv.name
        try:
            variables = json.loads(tags.get(VARIABLES_TAG) or "{}")
        except ValueError:
            raise PromptError(f"prompt {name} v{pv.version}: its variables tag is not JSON") from None
        if not isinstance(variables, dict):
            raise PromptError(f"prompt {name} v{pv.version}: its variables tag is not a mapping")
        template = PromptTemplate.from_chat_template(name, pv.template, variables, tags.get(DESCRIPTION_TAG, ""))
        digest = template.digest()
        if tags.get(DIGEST_TAG) != digest:
            raise PromptError(f"prompt {name} v{pv.version} does not match the digest it was registered with: its "
                              "template was changed in the store, or it was not registered by nightshift; register "
                              "the template again (nightshift prompts register)")
        created = datetime.fromtimestamp((pv.creation_timestamp or 0) / 1000, UTC).isoformat(timespec="seconds")
        return PromptVersion(name, int(pv.version), template, digest, pv.commit_message or "",
                             tags.get(BY_TAG, ""), created, tuple(getattr(pv, "aliases", []) or ()))

    # -- history ----------------------------------------------------------------------------------------------

    def history(self, name: str) -> list[PromptMove]:
        """Return every recorded move and decline of a prompt's aliases, in the order they were requested."""
        from mlflow.exceptions import MlflowException

        try:
            prompt = self.client.get_prompt(name)
        except MlflowException as exc:
            if names_nothing(exc):
                return []
            raise
        if prompt is None:
            return []
        moves = []
        for key, value in (prompt.tags or {}).items():
            if key.startswith(MOVE_TAG):
                try:
                    moves.append(PromptMove(**json.loads(value)))
                except (TypeError, ValueError):
                    log.warning("prompt %s: unreadable history record %s", name, key[len(MOVE_TAG):][:20])
        return sorted(moves, key=lambda m: m.requested_at)

    def _write(self, name: str, move: PromptMove) -> None:
        self.client.set_prompt_tag(name, MOVE_TAG + move.id, json.dumps(move.to_dict(), sort_keys=True))

    def move(self, version: PromptVersion, *, key: str, expected: int | None, kind: str, by: str, dag_run: str,
             reason: str, evaluation: dict[str, Any] | None = None, alias: str = PRODUCTION) -> PromptMove:
        """Point ``alias`` at ``version`` if it still names ``expected`` (None: no version), recording the move.

        A retry of the same ``key`` finishes its own record; a move to where the alias already is records nothing
        new. PromptConflict when the alias names another version now (the record says ``aborted``).
        """
        name = version.name
        mid = move_id(key)
        with self.lease(name, f"{kind} of {name}") as lease:
            history = self.history(name)
            own = next((m for m in history if m.id == mid), None)
            if own is not None and own.state in ("done", "aborted"):
                if own.state == "aborted":
                    raise PromptConflict(f"{name}@{alias}: this move was already refused (it named v"
                                         f"{own.from_version} when v{expected} was expected)")
                return own
            current = self._alias_target(name, alias)
            now = current
            later = own is not None and any(
                m.alias == alias and m.id != mid and m.requested_at > own.requested_at and m.state == "done"
                and m.kind != "declined" for m in history)
            if own is not None and later:
                # Other moves of this alias were recorded after this one was requested (a kill left it pending):
                # whether or not its write happened, it is history now, and making it again would undo them.
                own.state = "aborted"
                self._write(name, own)
                raise PromptConflict(f"{name}@{alias}: moves were recorded after this one was requested; it is not "
                                     "made again (evaluate the candidate again to release it)")
            if now == version.version:
                if own is not None:  # the alias was written before a kill: finish the record
                    own.state, own.at = "done", own.at or _now()
                    self._write(name, own)
                    return own
                return PromptMove(mid, alias, kind, now, version.version, by, dag_run, "already there", _now(),
                                  _now(), "done", digest=version.digest)
            record = own or PromptMove(mid, alias, kind, now, version.version, by[:200], dag_run[:250],
                                       " ".join(reason.split())[:MAX_REASON_CHARS], _now(),
                                       evaluation=evaluation or {}, digest=version.digest)
            if now != expected:
                record.state = "aborted"
                self._write(name, record)
                raise PromptConflict(
                    f"{name}@{alias} names {'v' + str(now) if now else 'no version'} now, not the "
                    f"{'v' + str(expected) if expected else 'absence of a version'} the candidate was evaluated "
                    "against: nothing was moved; evaluate the candidate again (trigger evaluate_prompt)")
            self._write(name, record)
            lease.check()
            self.client.set_prompt_alias(name, alias, version.version)
            record.state, record.at = "done", _now()
            self._write(name, record)
        log.info("%s@%s: %s -> v%d (%s by %s)", name, alias, f"v{now}" if now else "none", version.version, kind, by)
        return record

    def decline(self, version: PromptVersion, *, key: str, by: str, dag_run: str, reason: str,
                evaluation: dict[str, Any] | None = None) -> PromptMove:
        """Record that ``version`` was kept from production (the gate, a canary or a person); nothing moves."""
        return self.note(version, "declined", key=key, by=by, dag_run=dag_run, reason=reason, evaluation=evaluation)

    def note(self, version: PromptVersion, kind: str, *, key: str, by: str, dag_run: str, reason: str,
             evaluation: dict[str, Any] | None = None) -> PromptMove:
        """Record an event of ``version``'s release that moves no alias: ``declined``, or ``canary`` (it passed the
        gate and goes to a canary; rollout_model takes only such versions). A retry of ``key`` records nothing new."""
        name = version.name
        mid = move_id(key)
        with self.lease(name, f"{kind} of {name}"):
            own = next((m for m in self.history(name) if m.id == mid), None)
            if own is not None:
                return own
            record = PromptMove(mid, PRODUCTION if kind == "declined" else CANDIDATE, kind,
                                self._alias_target(name, PRODUCTION), version.version, by[:200], dag_run[:250],
                                " ".join(reason.split())[:MAX_REASON_CHARS], _now(), _now(), "done", evaluation or {},
                                version.digest)
            self._write(name, record)
        return record

    def _alias_target(self, name: str, alias: str) -> int | None:
        """Return the version number ``alias`` names, without reading (or judging) that version."""
        from mlflow.exceptions import MlflowException

        try:
            pv = self.client.get_prompt_version_by_alias(name, alias)
        except MlflowException as exc:
            if names_nothing(exc):
                return None
            raise
        return int(pv.version) if pv is not None else None

    # -- canary -----------------------------------------------------------------------------------------------

    def rollout(self, name: str) -> tuple[PromptVersion, float] | None:
        """Return the version under a canary and its share of traffic, or None (no candidate, or it is the
        production version)."""
        candidate = self.by_alias(name, CANDIDATE)
        if candidate is None:
            return None
        production = self.by_alias(name, PRODUCTION)
        if production is not None and production.version == candidate.version:
            return None
        prompt = self.client.get_prompt(name)
        try:
            state = json.loads((prompt.tags or {}).get(ROLLOUT_TAG) or "{}")
            share = float(state.get("share", 0)) if state.get("version") == candidate.version else 0.0
        except (TypeError, ValueError, AttributeError):
            share = 0.0
        return candidate, min(1.0, max(0.0, share))

    def start_rollout(self, version: PromptVersion, share: float) -> None:
        """Expose ``version`` to ``share`` of the traffic: the share is written first, the alias last."""
        if not 0 <= share <= 1:
            raise ValueError(f"a canary share is from 0 to 1, got {share}")
        self.set_share(version, share)
        self.client.set_prompt_alias(version.name, CANDIDATE, version.version)

    def set_share(self, version: PromptVersion, share: float) -> None:
        self.client.set_prompt_tag(version.name, ROLLOUT_TAG,
                                   json.dumps({"version": version.version, "share": round(share, 4)}))

    def end_rollout(self, version: PromptVersion) -> None:
        """Remove the candidate alias (traffic back to production), then the share."""
        from mlflow.exceptions import MlflowException

        current = self.by_alias(version.name, CANDIDATE)
        if current is not None and current.version == version.version:
            try:
                self.client.delete_prompt_alias(version.name, CANDIDATE)
            except MlflowException as exc:
                if not names_nothing(exc):
                    raise
        self.set_share(version, 0.0)

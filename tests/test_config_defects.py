"""Config defects found in review: YAML merge keys, trusted tenant header names, the
ConfigMap symlink layout, a version that followed the working directory, `report savings`
without a ledger or the redaction key, and the reload watcher's stamp and log."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from atp_extproc import cli
from atp_extproc import config as config_mod
from atp_extproc.config import ConfigError
from atp_extproc.policy.settings import load_file, load_yaml
from atp_extproc.server import ConfigHolder
from atp_extproc.stack import copy_example
from atp_extproc.store import AsyncLedger, LedgerEntry, PriceSnapshot, connect
from atp_extproc.store.ledger import LedgerUnavailable
from tests.conftest import MINIMAL_CONFIG

pytestmark = pytest.mark.usefixtures("keep_root_log_level")

SRC = "atp.yaml"
MODELS = """auth: {anonymous_tenant: anon}
models:
  - &small
    name: small
    cluster: demo_a
    upstream_model: up-small
    price: &cheap {input_per_1k: 0.001, output_per_1k: 0.002}
  - <<: *small
    name: large
    upstream_model: up-large
    price: {<<: *cheap, output_per_1k: 0.03}
routes:
  - {name: r, aliases: {a: [small, large]}}
"""
POLICY = "policies:\n  - {id: t.x, effect: deny, expression: request.stream}\n"




def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# -- 1. YAML merge keys ------------------------------------------------------------


def test_merge_keys_load_and_the_mappings_own_keys_win() -> None:
    snap = config_mod.parse(MODELS, SRC)
    large = snap.models["large"]
    assert (large.cluster, large.upstream_model) == ("demo_a", "up-large")
    assert (large.price.input_per_1k, large.price.output_per_1k) == (0.001, 0.03)
    assert snap.models["small"].upstream_model == "up-small"


def test_check_accepts_merge_keys(tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "atp.yaml"
    path.write_text(MODELS)
    code, output = run(capsys, "check", str(path))
    assert code == 0, output
    assert f"{path}: OK" in output


def test_a_key_a_mapping_gives_twice_is_still_refused_beside_a_merge() -> None:
    text = MODELS.replace("    name: large\n", "    name: large\n    name: huge\n")
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        config_mod.parse(text, SRC)
    _, problems = load_yaml(text, SRC)
    assert [(p.line, p.path) for p in problems] == [(10, "name")]


def test_a_duplicate_key_beside_aliases_of_aliases_is_named_at_once(tmp_path: Path) -> None:
    # Naming the key's path walked every alias's expansion: 9 aliases of 9 aliases ...
    # 12 levels deep (a 4 KB file) froze check, serve and a live reload.
    bomb = "bomb:\n  - &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 12))
    path = tmp_path / "atp.yaml"
    path.write_text(bomb + MINIMAL_CONFIG + "auth: {anonymous_tenant: anon}\n")
    done = subprocess.run(
        [sys.executable, "-m", "atp_extproc", "check", str(path)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "auth: the key appears twice" in done.stdout, done.stdout


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_number_that_is_not_finite_is_told_as_such(value: str) -> None:
    # A NaN passes no bound: it was told "less than or equal to 600".
    text = MINIMAL_CONFIG + f"server: {{grace_period_s: {value}}}\n"
    with pytest.raises(ConfigError) as raised:
        config_mod.parse(text, SRC)
    assert raised.value.problems == [("server.grace_period_s",
                                      "Input should be a finite number")]


def test_an_equals_sign_is_a_string_as_yaml_1_2_reads_it() -> None:
    # YAML 1.1's "value key": PyYAML resolved it, then could not build it ("could not
    # determine a constructor for the tag 'tag:yaml.org,2002:value'").
    config_mod.parse(MINIMAL_CONFIG + "policy: {environment: =}\n", SRC)
    doc, problems = load_yaml("policy: {environment: =}\na: {=: 1}\n", SRC)
    assert (doc, problems) == ({"policy": {"environment": "="}, "a": {"=": 1}}, [])


def test_binary_data_is_told_as_such() -> None:
    text = MINIMAL_CONFIG.replace("upstream_model: u,",
                                  "upstream_model: u, region: !!binary bG9jYWw=,")
    with pytest.raises(ConfigError) as raised:
        config_mod.parse(text, SRC)
    assert raised.value.problems == [("models[0].region",
                                      "expected a string, got binary data (!!binary)")]


def test_a_yaml_set_is_no_list() -> None:
    # Read as one, its order came from the hash seed: two replicas served one file's
    # alias from different first candidates.
    text = MINIMAL_CONFIG.replace("aliases: {a: [m]}", "aliases: {a: !!set {m}}")
    with pytest.raises(ConfigError) as raised:
        config_mod.parse(text, SRC)
    assert raised.value.problems == [("routes[0].aliases.a",
                                      "a YAML set (!!set) has no order: give a list")]


def test_two_merge_keys_in_one_mapping_are_a_duplicate() -> None:
    text = "a: &a {x: 1}\nb: &b {y: 2}\nc: {<<: *a, <<: *b}\n"
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key '<<'"):
        yaml.load(text, Loader=config_mod._StrictLoader)
    assert [p.path for p in load_yaml(text, SRC)[1]] == ["<<"]


@pytest.mark.parametrize(("text", "reason"), [
    ("a: &a {b: 1, <<: *a}\n", "a mapping cannot merge itself"),
    ("x: &x [1]\na: {<<: *x}\n", "takes a mapping or a list of mappings, not a scalar"),
])
def test_a_merge_of_no_mapping_is_named(text: str, reason: str) -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match=reason):
        yaml.load(text, Loader=config_mod._StrictLoader)
    assert reason in str(load_yaml(text, SRC)[1][0])


# An anchor that merges, merged again before its own mapping is built (the sequence item
# that holds it is built later): merging rewrites the anchor's key list in place. PyYAML
# itself gets `items[1].k`, `both.k` and `long` wrong (see KeyCheckingLoader).
CHAINED = """\
base: &base {k: 0, j: 0}
items:
  - {a: &mid {<<: *base, k: 1}}
  - {<<: *mid, j: 2}
both: {<<: [*mid, {k: 9, z: 1}], z: 3}
long: {<<: [{long_key: 1}, {long_key: 2}]}
"""


def test_merges_of_merges_are_no_duplicates_in_either_loader() -> None:
    want = {"base": {"k": 0, "j": 0},
            "items": [{"a": {"k": 1, "j": 0}}, {"k": 1, "j": 2}],
            # In a list of merged mappings, the first that has a key gives it.
            "both": {"k": 1, "j": 0, "z": 3}, "long": {"long_key": 1}}
    assert yaml.load(CHAINED, Loader=config_mod._StrictLoader) == want
    doc, problems = load_yaml(CHAINED, SRC)
    assert problems == [] and doc == want


# -- 2. auth.trusted_tenant_header ---------------------------------------------------


@pytest.mark.parametrize(("name", "reason"), [
    ("x-atp-tenant", "Envoy removes every x-atp-* header"),
    ("X-ATP-Tenant", "Envoy removes every x-atp-* header"),
    # The shipped configs remove x-envoy-* too: every request was a 401.
    ("x-envoy-tenant", "Envoy removes every x-envoy-* header"),
    # Envoy sets x-request-id: every keyless caller was a tenant of its own.
    ("x-request-id", "no hop in front can name a tenant in it"),
    ("content-length", "no hop in front can name a tenant in it"),
    # Each hop adds itself, or the tracer sets a new context per request.
    ("forwarded", "no hop in front can name a tenant in it"),
    ("Via", "no hop in front can name a tenant in it"),
    ("traceparent", "trace context"),
    ("x-b3-traceid", "trace context"),
    ("x-amzn-trace-id", "trace context"),
    ("", "it is empty"),
    ("x tenant", "not a valid HTTP header name"),
    ("x-tenant:", "not a valid HTTP header name"),
    (":path", "pseudo-header"),
    # Envoy hands it to ATP as :authority: every request was a 401.
    ("Host", "as :authority"),
    ("authorization", "credential"),
    ("Authorization", "credential"),
    ("api-key", "credential"),
    ("x-api-key", "credential"),
])
def test_a_trusted_tenant_header_that_can_never_work_is_refused(name: str,
                                                                reason: str) -> None:
    text = MINIMAL_CONFIG.replace("auth: {anonymous_tenant: anon}",
                                  f"auth: {{trusted_tenant_header: {name!r}}}")
    with pytest.raises(ConfigError) as raised:
        config_mod.parse(text, SRC)
    ((path, message),) = raised.value.problems
    assert path == "auth.trusted_tenant_header"
    assert "can never name the tenant" in message and reason in message


@pytest.mark.parametrize("field", ["tenant_claim", "payload_key", "metadata_namespace"])
@pytest.mark.parametrize("value", ["", " ", "tenant "])
def test_a_jwt_name_that_names_nothing_is_refused(field: str, value: str) -> None:
    # tenant_claim: '' was served: every caller with a verified token got a 401 about
    # "the token has no '' claim".
    text = MINIMAL_CONFIG.replace("auth: {anonymous_tenant: anon}",
                                  f"auth: {{jwt: {{{field}: {value!r}}}}}")
    with pytest.raises(ConfigError) as raised:
        config_mod.parse(text, SRC)
    ((path, message),) = raised.value.problems
    assert path == f"auth.jwt.{field}" and "names nothing jwt_authn writes" in message


@pytest.mark.parametrize("tenant", ["alice ", "", "bad tenant!"])
def test_a_route_tenant_no_tenant_can_have_is_refused(tenant: str) -> None:
    # Accepted, the route silently matched nobody: alice's alias answered 404.
    text = MINIMAL_CONFIG.replace("{name: r, aliases",
                                  f"{{name: r, match: {{tenants: [anon, {tenant!r}]}}, aliases")
    with pytest.raises(ConfigError) as raised:
        config_mod.parse(text, SRC)
    ((path, message),) = raised.value.problems
    assert path == "routes[0].match.tenants[1]" and "pattern" in message


def test_a_usable_trusted_tenant_header_is_kept_in_lower_case() -> None:
    text = MINIMAL_CONFIG.replace("auth: {anonymous_tenant: anon}",
                                  "auth: {trusted_tenant_header: X-Tenant_Id.2}")
    assert config_mod.parse(text, SRC).auth.trusted_tenant_header == "x-tenant_id.2"


# -- 3. the ConfigMap layout -----------------------------------------------------------

CONFIGMAP_CONFIG = MINIMAL_CONFIG + """ledger: {path: data/ledger.sqlite3}
policy: {include: [policies/*.yaml]}
"""


def publish(root: Path, stamp: str, files: dict[str, str]) -> None:
    """What the kubelet does for a ConfigMap volume: the files in a new timestamped
    directory, `..data` swapped onto it by a rename, the top-level names linked through
    `..data`, and the old directory removed."""
    new = root / f"..{stamp}"
    for name, text in files.items():
        (new / name).parent.mkdir(parents=True, exist_ok=True)
        (new / name).write_text(text)
    old = (root / "..data").resolve() if (root / "..data").exists() else None
    (root / "..data_tmp").symlink_to(new.name)
    os.replace(root / "..data_tmp", root / "..data")
    for top in {name.split("/")[0] for name in files}:
        if not (root / top).is_symlink():
            (root / top).symlink_to(f"..data/{top}")
    if old is not None:
        shutil.rmtree(old)


def configmap(tmp_path: Path, stamp: str = "2026_11_27_10_00_00.1") -> Path:
    root = tmp_path / "etc-atp"
    root.mkdir(exist_ok=True)
    publish(root, stamp, {"atp.yaml": CONFIGMAP_CONFIG, "policies/a.yaml": POLICY})
    return root


def test_a_configmap_update_moves_no_path_and_keeps_the_version(tmp_path: Path) -> None:
    root = configmap(tmp_path)
    before = config_mod.load(root / "atp.yaml")
    publish(root, "2026_11_27_10_05_00.2",
            {"atp.yaml": CONFIGMAP_CONFIG, "policies/a.yaml": POLICY})
    after = config_mod.load(root / "atp.yaml")
    assert before.ledger.path == after.ledger.path == str(root / "data" / "ledger.sqlite3")
    assert before.version == after.version
    assert before.include_globs == after.include_globs == (str(root / "policies/*.yaml"),)


def test_a_configmap_update_is_no_restart_warning(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    root = configmap(tmp_path)
    holder = ConfigHolder(root / "atp.yaml", config_mod.load(root / "atp.yaml"))
    publish(root, "2026_11_27_10_05_00.2", {"atp.yaml": CONFIGMAP_CONFIG + "# edited\n",
                                            "policies/a.yaml": POLICY})
    assert holder._file_stamp() != holder._stamp
    with caplog.at_level("INFO", logger="atp.server"):
        assert holder.reload("file changed")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


SMALL = PriceSnapshot.of("small", 0.00015, 0.0006)


def entry(tenant: str) -> LedgerEntry:
    return LedgerEntry(ts=1_767_225_600, tenant=tenant, route="r", model="small",
                       price=SMALL, baseline=None, input_tokens=10, output_tokens=1)


def test_a_ledger_beside_a_configmap_outlives_its_updates(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = configmap(tmp_path)
    first = (root / "..data").resolve()
    ledger = AsyncLedger(config_mod.load(root / "atp.yaml").ledger.path, start=False)
    try:
        ledger.record(entry("a"))
        ledger.flush()
        publish(root, "2026_11_27_10_05_00.2",
                {"atp.yaml": CONFIGMAP_CONFIG, "policies/a.yaml": POLICY})
        ledger.record(entry("b"))
        with caplog.at_level("ERROR", logger="atp.ledger"):
            ledger.flush()
    finally:
        ledger.close()
    assert not caplog.records  # no "deleted or replaced"
    assert not first.exists()  # the replaced directory was not made again


def test_a_ledger_directory_gone_is_an_error_not_made_anew(tmp_path: Path) -> None:
    path = tmp_path / "volume" / "ledger.sqlite3"
    ledger = AsyncLedger(path, start=False)  # the first start makes the directory
    try:
        ledger.flush()
        shutil.rmtree(path.parent)
        ledger.record(entry("waiting"))
        with pytest.raises(LedgerUnavailable, match="No such file or directory"):
            ledger.flush()
        assert not path.parent.exists()
        path.parent.mkdir()  # the volume is back: the rows kept go there
        assert ledger.flush() == 1
    finally:
        ledger.close()


# -- 4. the version does not follow the working directory -----------------------------


def test_the_version_is_the_same_from_any_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = copy_example(tmp_path / "conf")
    versions, digests = set(), set()
    for cwd, name in [(path.parent, "atp.yaml"), (tmp_path, "conf/atp.yaml"),
                      (Path("/"), str(path))]:
        monkeypatch.chdir(cwd)
        versions.add(config_mod.load(name).version)
        digests.add(load_file(name).digest)
    assert len(versions) == 1 and len(digests) == 1


# -- 5. report savings reads the ledger path alone --------------------------------------


def test_report_savings_says_a_config_without_a_ledger_has_none(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    connect(tmp_path / ".run" / "atp-ledger.sqlite3").close()  # not this config's
    path = tmp_path / "atp.yaml"
    path.write_text(MINIMAL_CONFIG + "ledger: {enabled: false}\n")
    code, output = run(capsys, "report", "savings", "--config", str(path))
    assert code == 2
    assert output == (f"atp-extproc: {path} has ledger.enabled: false, so ATP keeps no "
                      "ledger with it (give --db FILE to read one)\n")


def test_report_savings_needs_no_redaction_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATP_REDACT_HMAC_KEY", raising=False)
    path = tmp_path / "atp.yaml"
    path.write_text(MINIMAL_CONFIG + "redaction: {actions: {email: hash}}\n"
                    "ledger: {path: ledger.sqlite3}\n")
    with pytest.raises(ConfigError, match="ATP_REDACT_HMAC_KEY"):
        config_mod.load(path)  # serving still needs it
    connect(tmp_path / "ledger.sqlite3").close()
    code, output = run(capsys, "report", "savings", "--config", str(path))
    assert code == 0, output
    assert "no ledger rows" in output


# -- 6. the reload watcher -------------------------------------------------------------


def test_an_edit_made_while_atp_starts_is_reloaded(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "policies").mkdir()
    policy = tmp_path / "policies" / "a.yaml"
    policy.write_text(POLICY)
    path = tmp_path / "atp.yaml"
    path.write_text(MINIMAL_CONFIG + "policy: {include: [policies/*.yaml]}\n")
    load = config_mod.load
    loads = []

    def load_then_edit(name: object) -> config_mod.Snapshot:
        snapshot = load(name)  # type: ignore[arg-type]
        if not loads:
            policy.write_text(POLICY.replace("t.x", "t.edited"))
        loads.append(snapshot)
        return snapshot

    monkeypatch.setattr(config_mod, "load", load_then_edit)
    holder = ConfigHolder.load(path)
    assert len(loads) == 2  # read again at once, not left to the first poll
    assert holder._file_stamp() == holder._stamp
    assert holder.current.policies is not None
    assert [p.id for p in holder.current.policies.policies] == ["t.edited"]


def test_a_holder_loaded_unchanged_has_nothing_to_reload(tmp_path: Path) -> None:
    root = configmap(tmp_path)
    holder = ConfigHolder.load(root / "atp.yaml")
    assert holder._file_stamp() == holder._stamp


def test_the_file_put_back_after_a_rejection_is_said_valid_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "atp.yaml"
    path.write_text(MINIMAL_CONFIG)
    holder = ConfigHolder(path, config_mod.load(path))
    version = holder.current.version
    path.write_text(MINIMAL_CONFIG + "routes: []\n")
    assert not holder.reload("file changed")
    path.write_text(MINIMAL_CONFIG)
    caplog.clear()
    with caplog.at_level("INFO", logger="atp.server"):
        assert holder.reload("file changed")
    (message,) = [r.getMessage() for r in caplog.records]
    assert "valid again" in message and version in message
    caplog.clear()
    with caplog.at_level("INFO", logger="atp.server"):
        assert holder.reload("SIGHUP")  # nothing was rejected since: only "unchanged"
    assert [r.getMessage() for r in caplog.records] == [
        f"config reloaded (SIGHUP): unchanged, version {version}"]


def test_a_changed_policy_include_is_one_reload(tmp_path: Path) -> None:
    """The stamp taken before a reload covers what the file names then: the next poll
    finds nothing new (it used to find the new glob's files and reload again)."""
    rule = "policies:\n  - {id: t.%s, effect: deny, expression: request.stream}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "p.yaml").write_text(rule % "a")
    (tmp_path / "b" / "p.yaml").write_text(rule % "b")
    path = tmp_path / "atp.yaml"
    path.write_text(MINIMAL_CONFIG + "policy: {include: ['a/*.yaml']}\n")
    holder = ConfigHolder.load(path)
    path.write_text(MINIMAL_CONFIG + "policy: {include: ['a/*.yaml', 'b/*.yaml']}\n")
    assert holder.reload("file changed")
    assert len(holder.current.policies.policies) == 2
    assert holder._file_stamp() == holder._stamp  # the watcher's test: nothing to reload
    # A refused edit is stamped as read too: not refused again at every poll.
    path.write_text(MINIMAL_CONFIG + "policy: {include: ['c/*.yaml']}\n")
    assert not holder.reload("file changed")
    assert holder._file_stamp() == holder._stamp

"""Unit tests for atp_extproc.config: loading, every kind of error, the snapshot."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pydantic
import pytest
import yaml

from atp_extproc import config
from atp_extproc.config import ConfigError, Snapshot

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "atp.yaml"
SRC = "atp-test.yaml"
ALICE_SHA = hashlib.sha256(b"sk-demo-alice").hexdigest()

BASE = {
    "auth": {"api_keys": [{"key_id": "k1", "tenant": "alice", "sha256": ALICE_SHA}]},
    "models": [
        {"name": "small", "cluster": "demo_a", "upstream_model": "up-small",
         "price": {"input_per_1k": 0.001, "output_per_1k": 0.002}},
        {"name": "large", "cluster": "demo_b", "upstream_model": "up-large",
         "price": {"input_per_1k": 0.01, "output_per_1k": 0.03}},
    ],
    "routes": [
        {"name": "chat", "match": {"paths": ["/v1/chat/completions"]},
         "aliases": {"fast": ["small"], "best": ["large", "small"]}, "default": "fast"},
    ],
}


def base() -> dict:
    return yaml.safe_load(yaml.safe_dump(BASE, sort_keys=False))


def parse_dict(doc: dict) -> Snapshot:
    return config.parse(yaml.safe_dump(doc, sort_keys=False), SRC)


def error_of(doc_or_text: dict | str) -> ConfigError:
    text = doc_or_text if isinstance(doc_or_text, str) else yaml.safe_dump(doc_or_text)
    with pytest.raises(ConfigError) as info:
        config.parse(text, SRC)
    return info.value


def assert_names(err: ConfigError, path: str, *reason_parts: str) -> None:
    message = str(err)
    assert err.file == SRC
    line = next((ln for ln in message.splitlines() if f"{SRC}: {path}: " in ln), None)
    assert line is not None, f"no line for {path!r} in:\n{message}"
    for part in reason_parts:
        assert part in line, f"{part!r} not in {line!r}"
    assert any(p == path for p, _ in err.problems)


# -- the example -------------------------------------------------------------------


def test_example_loads() -> None:
    snap = config.load(EXAMPLE)
    assert snap.source == str(EXAMPLE)
    assert set(snap.models) == {"small", "large", "embed"}
    assert [r.name for r in snap.routes] == ["embeddings", "chat-premium", "chat-auto", "chat"]
    assert snap.models["large"].cluster == "demo_b"
    assert snap.models["large"].upstream_model == "demo-large-2026"
    assert snap.models["large"].price.input_per_1k == 0.0025
    assert snap.models["large"].price.output_per_1k == 0.01
    assert snap.server.max_body_bytes == 4 * 1024 * 1024
    assert snap.server.max_json_depth == 64
    assert snap.auth.jwt is not None and snap.auth.jwt.payload_key == "jwt_payload"
    assert {k.tenant for k in snap.api_keys.values()} == {"alice", "bob"}
    assert snap.api_keys[config.hash_api_key("sk-demo-alice")].key_id == "alice-demo"
    assert snap.api_keys[config.hash_api_key("sk-demo-bob")].key_id == "bob-demo"


def test_load_accepts_str_path() -> None:
    assert config.load(str(EXAMPLE)).version == config.load(EXAMPLE).version


def test_version_follows_text_and_included_policies() -> None:
    text = EXAMPLE.read_text()
    src = str(EXAMPLE)
    a = config.parse(text, src)
    assert config.parse(text, src).version == a.version
    assert config.parse(text + "\n# comment\n", src).version != a.version
    assert a.files[0] == src and len(a.files) > 1  # atp.yaml, then its policy files


def test_defaults() -> None:
    snap = parse_dict(base())
    assert snap.server.listen == "127.0.0.1:50051"
    assert snap.server.max_json_depth == 64
    assert snap.models["small"].egress == "external"
    assert snap.models["small"].region == "unspecified"
    assert snap.auth.jwt is None
    assert snap.auth.anonymous_tenant is None


def test_sha256_uppercase_is_normalised() -> None:
    doc = base()
    doc["auth"]["api_keys"][0]["sha256"] = ALICE_SHA.upper()
    snap = parse_dict(doc)
    assert ALICE_SHA in snap.api_keys


def test_hash_api_key() -> None:
    assert config.hash_api_key("sk-demo-alice") == ALICE_SHA
    assert len(config.hash_api_key("")) == 64


# -- errors: shapes ----------------------------------------------------------------


def test_error_negative_price_names_path() -> None:
    doc = base()
    doc["models"][1]["price"]["input_per_1k"] = -1
    assert_names(error_of(doc), "models[1].price.input_per_1k", "greater than or equal to 0")


@pytest.mark.parametrize("cluster", ["atp", "atp_shadow", "atp_ext_proc"])
def test_error_model_on_atps_own_cluster(cluster: str) -> None:
    doc = base()
    doc["models"][0]["cluster"] = cluster
    assert_names(error_of(doc), "models[0].cluster", "ATP's own")


@pytest.mark.parametrize(("cluster", "ok"), [
    ("outbound|443||api.openai.com", True),  # as Istio names a ServiceEntry's cluster
    ("outbound|80|v1|demo.svc", True),
    ("demo a", False), ("|outbound", False), ("demo\r\nx-atp-cluster: b", False),
    # Istio's own: back into the pod, or wherever the Host says.
    ("inbound|8080||", False), ("PassthroughCluster", False)])
def test_a_model_cluster_is_an_envoy_cluster_name(cluster: str, ok: bool) -> None:
    doc = base()
    doc["models"][0]["cluster"] = cluster
    if ok:
        assert config.parse(yaml.safe_dump(doc), "t.yaml").models[
            doc["models"][0]["name"]].cluster == cluster
    else:
        assert_names(error_of(doc), "models[0].cluster")


def test_error_price_not_a_number() -> None:
    doc = base()
    doc["models"][0]["price"]["output_per_1k"] = "cheap"
    assert_names(error_of(doc), "models[0].price.output_per_1k")


def test_error_missing_price() -> None:
    doc = base()
    del doc["models"][1]["price"]
    assert_names(error_of(doc), "models[1].price", "required")


def test_error_infinite_price() -> None:
    text = yaml.safe_dump(base()).replace("input_per_1k: 0.01", "input_per_1k: .inf")
    assert ".inf" in text
    assert_names(error_of(text), "models[1].price.input_per_1k")


def test_error_bad_sha256() -> None:
    doc = base()
    doc["auth"]["api_keys"][0]["sha256"] = "not-a-digest"
    assert_names(error_of(doc), "auth.api_keys[0].sha256", "64 hex digits")


def test_error_sha256_too_short() -> None:
    doc = base()
    doc["auth"]["api_keys"][0]["sha256"] = ALICE_SHA[:-1]
    assert_names(error_of(doc), "auth.api_keys[0].sha256")


def test_error_sha256_with_trailing_newline() -> None:
    doc = base()
    doc["auth"]["api_keys"][0]["sha256"] = ALICE_SHA + "\n"
    assert_names(error_of(doc), "auth.api_keys[0].sha256")


def test_error_unknown_api_path() -> None:
    doc = base()
    doc["routes"][0]["match"]["paths"] = ["/v1/chat/completions", "/v1/embed"]
    assert_names(error_of(doc), "routes[0].match.paths", "unknown API path '/v1/embed'")


@pytest.mark.parametrize("field", ["name", "cluster", "upstream_model"])
@pytest.mark.parametrize("value", ["has space", "new\nline", "", "-leading", "x" * 129, "ü"])
def test_error_model_tokens(field: str, value: str) -> None:
    doc = base()
    doc["models"][0][field] = value
    err = error_of(doc)
    assert_names(err, f"models[0].{field}")


def test_error_cluster_with_trailing_newline() -> None:
    doc = base()
    doc["models"][1]["cluster"] = "demo_b\n"
    assert_names(error_of(doc), "models[1].cluster")


def test_error_bad_egress() -> None:
    doc = base()
    doc["models"][0]["egress"] = "sideways"
    assert_names(error_of(doc), "models[0].egress")


def test_error_extra_key_top_level_and_nested() -> None:
    doc = base()
    doc["modles"] = []
    doc["models"][0]["prise"] = 1
    err = error_of(doc)
    assert_names(err, "modles", "Extra inputs")
    assert_names(err, "models[0].prise", "Extra inputs")


def test_error_empty_models_and_routes() -> None:
    doc = base()
    doc["models"] = []
    doc["routes"] = []
    err = error_of(doc)
    assert_names(err, "models")
    assert_names(err, "routes")


def test_error_missing_models() -> None:
    doc = base()
    del doc["models"]
    assert_names(error_of(doc), "models", "required")


def test_error_alias_without_candidates() -> None:
    doc = base()
    doc["routes"][0]["aliases"]["empty"] = []
    assert_names(error_of(doc), "routes[0].aliases", "'empty' has no candidate models")


def test_error_route_without_aliases() -> None:
    doc = base()
    doc["routes"][0]["aliases"] = {}
    del doc["routes"][0]["default"]
    assert_names(error_of(doc), "routes[0].aliases")


@pytest.mark.parametrize(
    "section, key, value",
    [("server", "max_body_bytes", 100), ("server", "max_body_bytes", 10**12),
     ("server", "max_json_depth", 1), ("server", "max_json_depth", 10_000),
     ("server", "grace_period_s", -1), ("server", "reload_poll_s", 0),
     ("server", "log_level", "TRACE")],
)
def test_error_server_ranges(section: str, key: str, value) -> None:
    doc = base()
    doc[section] = {key: value}
    assert_names(error_of(doc), f"{section}.{key}")


# -- errors: references ------------------------------------------------------------


def test_error_alias_unknown_model() -> None:
    doc = base()
    doc["routes"][0]["aliases"]["fast"] = ["nope"]
    assert_names(error_of(doc), "routes[0].aliases.fast[0]", "unknown model 'nope'")


def test_error_alias_unknown_second_candidate_in_second_route() -> None:
    doc = base()
    doc["routes"].append({"name": "two", "aliases": {"x": ["small", "ghost"]}})
    assert_names(error_of(doc), "routes[1].aliases.x[1]", "unknown model 'ghost'")


def test_error_duplicate_model_names() -> None:
    doc = base()
    doc["models"][1]["name"] = "small"
    assert_names(error_of(doc), "models[1].name", "duplicate model name 'small'")


def test_error_duplicate_route_names() -> None:
    doc = base()
    doc["routes"].append({"name": "chat", "aliases": {"x": ["small"]}})
    assert_names(error_of(doc), "routes[1].name", "duplicate route name 'chat'")


def test_error_duplicate_api_key() -> None:
    doc = base()
    doc["auth"]["api_keys"].append({"key_id": "k2", "tenant": "bob", "sha256": ALICE_SHA})
    assert_names(error_of(doc), "auth.api_keys[1].sha256", "listed twice")


def test_error_duplicate_api_key_differing_only_in_case() -> None:
    doc = base()
    doc["auth"]["api_keys"].append({"key_id": "k2", "tenant": "bob",
                                    "sha256": ALICE_SHA.upper()})
    assert_names(error_of(doc), "auth.api_keys[1].sha256", "listed twice")


def test_error_default_not_an_alias() -> None:
    doc = base()
    doc["routes"][0]["default"] = "small"  # a model name, not an alias
    assert_names(error_of(doc), "routes[0].default", "'small' is not an alias")


def test_error_no_identity_source() -> None:
    doc = base()
    doc["auth"] = {}
    assert_names(error_of(doc), "auth", "no identity source")
    del doc["auth"]
    assert_names(error_of(doc), "auth", "no identity source")


def test_error_lists_every_reference_problem() -> None:
    doc = base()
    doc["models"][1]["name"] = "small"
    doc["routes"][0]["default"] = "nope"
    doc["routes"][0]["aliases"]["best"] = ["large", "small"]
    err = error_of(doc)
    paths = [p for p, _ in err.problems]
    assert "models[1].name" in paths
    assert "routes[0].default" in paths
    assert "routes[0].aliases.best[0]" in paths
    assert len(str(err).splitlines()) == len(err.problems)


@pytest.mark.parametrize(
    "auth",
    [
        {"jwt": {}},
        {"trusted_tenant_header": "x-tenant"},
        {"anonymous_tenant": "public"},
    ],
)
def test_each_identity_source_is_enough(auth: dict) -> None:
    doc = base()
    doc["auth"] = auth
    assert parse_dict(doc)


# -- errors: the file itself -------------------------------------------------------


def test_error_invalid_yaml_has_line_number() -> None:
    text = "server:\n  listen: x\nmodels: [1, 2\nroutes: []\n"
    err = error_of(text)
    message = str(err)
    assert message.startswith(f"{SRC}: line ")
    assert "invalid YAML" in message
    line_no = int(message.split("line ")[1].split(":")[0])
    assert line_no in (3, 4)


def test_error_invalid_yaml_bad_indent() -> None:
    err = error_of("models:\n  - name: a\n cluster: b\n")
    assert "line 3" in str(err)
    assert "invalid YAML" in str(err)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just a string\n",
                                  "42\n", "null\n"])
def test_error_non_mapping_file(text: str) -> None:
    err = error_of(text)
    assert str(err) == f"{SRC}: <root>: the file must hold a mapping (models:, routes:, ...)"


def test_error_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "atp.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(missing)
    assert info.value.file == str(missing)
    assert str(info.value).startswith(f"{missing}: <root>: cannot read")


def test_error_not_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "atp.yaml"
    path.write_bytes(b"models: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_error_in_loaded_file_names_that_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    doc = base()
    doc["models"][1]["price"]["input_per_1k"] = -5
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert f"{path}: models[1].price.input_per_1k: " in str(info.value)


# -- the snapshot ------------------------------------------------------------------


def test_snapshot_attributes_cannot_be_assigned() -> None:
    snap = config.load(EXAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.version = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.routes = ()  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        snap.server.max_body_bytes = 1  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        snap.models["small"].cluster = "evil"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        snap.models["small"].price.input_per_1k = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.routes[0].match.paths[0] = "/x"  # type: ignore[index]
    assert snap.models["small"].cluster == "demo_a"


def test_snapshot_mappings_are_read_only() -> None:
    snap = config.load(EXAMPLE)
    with pytest.raises(TypeError):
        snap.models["evil"] = snap.models["small"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap.api_keys.clear()  # type: ignore[attr-defined]


def test_route_aliases_are_read_only() -> None:
    snap = config.load(EXAMPLE)
    with pytest.raises(TypeError):
        snap.routes[0].aliases["evil"] = ("large",)  # type: ignore[index]


def test_routes_for_respects_path_and_tenant() -> None:
    snap = config.load(EXAMPLE)
    names = lambda path, tenant: [r.name for r in snap.routes_for(path, tenant)]  # noqa: E731
    assert names("/v1/chat/completions", "alice") == ["chat-premium", "chat-auto", "chat"]
    assert names("/v1/chat/completions", "bob") == ["chat-auto", "chat"]
    assert names("/v1/responses", "alice") == ["chat-premium", "chat"]
    assert names("/v1/completions", "bob") == ["chat"]
    assert names("/v1/embeddings", "alice") == ["embeddings"]
    assert names("/v1/embeddings", "bob") == ["embeddings"]
    assert names("/v1/models", "alice") == []
    assert names("/v1/nope", "alice") == []


def test_route_without_match_serves_everything() -> None:
    doc = base()
    doc["routes"].append({"name": "any", "aliases": {"anything": ["small"]}})
    snap = parse_dict(doc)
    assert [r.name for r in snap.routes_for("/v1/embeddings", "zed")] == ["any"]
    assert [r.name for r in snap.routes_for("/v1/chat/completions", "zed")] == ["chat", "any"]


def test_route_matching_tenants_only() -> None:
    doc = base()
    doc["routes"].append({"name": "vip", "match": {"tenants": ["alice"]},
                          "aliases": {"vip": ["large"]}})
    snap = parse_dict(doc)
    assert [r.name for r in snap.routes_for("/v1/embeddings", "alice")] == ["vip"]
    assert [r.name for r in snap.routes_for("/v1/embeddings", "bob")] == []
    assert snap.aliases_for("alice") == ["fast", "best", "vip"]
    assert snap.aliases_for("bob") == ["fast", "best"]


def test_aliases_for_tenant() -> None:
    snap = config.load(EXAMPLE)
    assert snap.aliases_for("alice") == ["text-embedding-3-small", "gpt-4o", "auto",
                                         "gpt-4o-mini", "fast"]
    assert snap.aliases_for("bob") == ["text-embedding-3-small", "auto", "gpt-4o-mini", "fast"]
    assert "gpt-4o" not in snap.aliases_for("anyone-else")


def test_aliases_for_deduplicates_keeping_first_order() -> None:
    doc = base()
    doc["routes"].append({"name": "again", "aliases": {"best": ["small"], "new": ["small"]}})
    assert parse_dict(doc).aliases_for("t") == ["fast", "best", "new"]


def test_routes_for_tenant() -> None:
    snap = config.load(EXAMPLE)
    assert [r.name for r in snap.routes_for_tenant("bob")] == ["embeddings", "chat-auto",
                                                               "chat"]
    assert [r.name for r in snap.routes_for_tenant("alice")] == [
        "embeddings", "chat-premium", "chat-auto", "chat"]


def test_yaml_key_given_twice_is_refused_with_its_line() -> None:
    text = EXAMPLE.read_text() + "\nroutes:\n  - name: x\n    aliases: {a: [small]}\n"
    with pytest.raises(config.ConfigError) as err:
        config.parse(text, "dup.yaml")
    message = str(err.value)
    assert "dup.yaml" in message and "duplicate key 'routes'" in message
    assert f"line {text.count(chr(10)) - 2}" in message


# -- review regressions ------------------------------------------------------------


@pytest.mark.parametrize("price", [0.0000000004, 1.5e-10, 0.0000001234567891])
def test_error_price_the_ledger_cannot_represent(price: float) -> None:
    # Whole picodollars per token = 9 decimal places per 1K; these would round (to 0).
    doc = base()
    doc["models"][0]["price"]["output_per_1k"] = price
    assert_names(error_of(doc), "models[0].price.output_per_1k", "more than 9 decimal places")


@pytest.mark.parametrize("price", [0.000000001, 0.00015, 0.123456789, 1000])
def test_prices_in_whole_picodollars_are_accepted(price: float) -> None:
    doc = base()
    doc["models"][0]["price"]["input_per_1k"] = price
    assert parse_dict(doc).models["small"].price.input_per_1k == price


def test_error_absurd_price() -> None:
    doc = base()
    doc["models"][1]["price"]["input_per_1k"] = 1.0e10
    assert_names(error_of(doc), "models[1].price.input_per_1k", "less than or equal to 1000")


def test_error_unhashable_yaml_key_names_file_and_line() -> None:
    text = yaml.safe_dump(base(), sort_keys=False).replace(
        "    fast:\n", "    ? [a, b]\n    : [small]\n    fast:\n")
    assert "? [a, b]" in text
    err = error_of(text)
    assert err.file == SRC and "mapping key must be a scalar" in str(err)
    assert "line " in err.problems[0][0]


def test_error_deep_nesting_is_a_config_error() -> None:
    text = yaml.safe_dump(base()) + "policy: " + "[" * 5000 + "]" * 5000 + "\n"
    err = error_of(text)
    assert "nested too deeply" in str(err)


def test_a_date_like_value_is_a_string_named_by_its_path() -> None:
    # YAML 1.1 read it as a timestamp: "invalid YAML: month must be in 1..12", no path.
    doc = base()
    doc["models"][0]["region"] = "2026-13-01"
    text = yaml.safe_dump(doc).replace("'2026-13-01'", "2026-13-01")
    assert next(iter(config.parse(text, SRC).models.values())).region == "2026-13-01"
    err = error_of(yaml.safe_dump(base()) + "extra: 2026-13-01\n")
    assert_names(err, "extra", "Extra inputs are not permitted")


def test_yaml_1_2_numbers() -> None:
    # YAML 1.1 read 017 as 15 (octal), 1:30 as 90 (minutes and seconds), 1_000 as 1000:
    # grace_period_s: 017 ran with 15 s, and the environment 12:30 was refused.
    from atp_extproc.policy.settings import KeyCheckingLoader

    assert yaml.load("a: [017, 0o17, 0x10, 1:30, 1_000, 1e3, 2.5, -4]",
                     Loader=KeyCheckingLoader) == {
        "a": [17, 15, 16, "1:30", "1_000", 1000.0, 2.5, -4]}
    doc = base()
    doc["server"] = {"grace_period_s": 17}
    text = yaml.safe_dump(doc).replace("grace_period_s: 17", "grace_period_s: 017")
    assert config.parse(text, SRC).server.grace_period_s == 17


def test_yaml_1_1_words_are_strings() -> None:
    # `shadow: {mode: off}` was refused as "Input should be 'off', 'decision' or
    # 'mirror'" (YAML 1.1 read off as false), and the region NO (Norway) as false.
    from atp_extproc.policy.settings import KeyCheckingLoader

    assert yaml.load("a: [true, False, yes, on, off, NO]", Loader=KeyCheckingLoader) == {
        "a": [True, False, "yes", "on", "off", "NO"]}


def test_error_alias_lists_a_model_twice() -> None:
    doc = base()
    doc["routes"][0]["aliases"]["best"] = ["large", "small", "large"]
    err = error_of(doc)
    assert_names(err, "routes[0].aliases.best[2]", "'large' is listed twice")
    assert len(err.problems) == 1


def test_no_spurious_min_length_error_beside_an_invalid_item() -> None:
    doc = base()
    doc["models"][0]["price"]["input_per_1k"] = -1
    doc["routes"][0]["aliases"]["fast"] = "small"          # not a list
    err = error_of(doc)
    assert [p for p, _ in err.problems] == ["models[0].price.input_per_1k",
                                           "routes[0].aliases.fast"]


def test_default_deny_without_policies_still_denies() -> None:
    from atp_extproc.exchange import Exchange
    from tests.test_exchange import req_body, req_headers

    doc = base()
    doc["policy"] = {"default": "deny", "mode": "enforce"}
    snap = parse_dict(doc)
    assert snap.policies is not None and not snap.policies.policies
    ex = Exchange(snap)
    ex.handle(req_headers("POST", "/v1/chat/completions", "sk-demo-alice"))
    resp = ex.handle(req_body({"model": "fast",
                               "messages": [{"role": "user", "content": "hi"}]}))
    assert resp.immediate_response.status.code == 403
    # default allow with no policies: no set, no policy work per request.
    assert parse_dict(base()).policies is None


def test_snapshot_lists_include_globs_absolute(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text("policies: []\n")
    doc = base()
    doc["policy"] = {"include": ["policies/*.yaml"]}
    path = tmp_path / "atp.yaml"
    path.write_text(yaml.safe_dump(doc))
    snap = config.load(path)
    assert snap.include_globs == (str(tmp_path.resolve() / "policies" / "*.yaml"),)


def _policy_file(directory: Path, policy_id: str) -> None:
    (directory / "policies").mkdir(parents=True)
    (directory / "policies" / "p.yaml").write_text(
        f"policies:\n  - id: {policy_id}\n    effect: deny\n"
        "    expression: subject.tenant == 'nobody'\n")


def test_include_globs_take_the_config_directory_as_it_is_named(tmp_path: Path) -> None:
    # `team[prod]/` globbed as a pattern read its sibling `teamp/`'s policies: a deny
    # of the config's own silently did not apply.
    _policy_file(tmp_path / "team[prod]", "own.deny")
    _policy_file(tmp_path / "teamp", "sibling.deny")
    doc = base()
    doc["policy"] = {"include": ["policies/*.yaml"]}
    path = tmp_path / "team[prod]" / "atp.yaml"
    path.write_text(yaml.safe_dump(doc))
    snap = config.load(path)
    assert [p.id for p in snap.policies.policies] == ["own.deny"]
    # The file watch matches what the load read.
    from atp_extproc.server import ConfigHolder
    stamp = ConfigHolder._stamp_of(path, snap.files, snap.include_globs)
    assert [m for m in dict(stamp)["policy.include"]] == [
        str(tmp_path.resolve() / "team[prod]" / "policies" / "p.yaml")]


def test_an_include_glob_over_the_configs_own_directory_passes_it_by(tmp_path: Path) -> None:
    # `*.yaml` beside atp.yaml took atp.yaml too: refused as "an included policy file
    # holds only `policies:`", each of its policies "a duplicate of itself".
    (tmp_path / "team.yaml").write_text(
        "policies:\n  - id: team.deny\n    effect: deny\n"
        "    expression: subject.tenant == 'nobody'\n")
    doc = base()
    doc["policy"] = {"include": ["*.yaml"]}
    doc["policies"] = [{"id": "own.deny", "effect": "deny",
                        "expression": "subject.tenant == 'nobody'"}]
    path = tmp_path / "atp.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert sorted(p.id for p in config.load(path).policies.policies) == ["own.deny",
                                                                         "team.deny"]


def test_an_include_pattern_naming_dot_files_matches_them(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / ".team.yaml").write_text(
        "policies:\n  - id: t.hidden\n    effect: deny\n"
        "    expression: subject.tenant == 'nobody'\n")
    doc = base()
    doc["policy"] = {"include": ["policies/.*.yaml"]}
    path = tmp_path / "atp.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert [p.id for p in config.load(path).policies.policies] == ["t.hidden"]


def test_a_config_in_a_dot_directory_matches_no_dot_file(tmp_path: Path) -> None:
    # `.config/atp/` made every include take dot files: an editor's lock link and a
    # hidden copy were read.
    base_dir = tmp_path / ".config" / "atp"
    _policy_file(base_dir, "own.deny")
    (base_dir / "policies" / ".p.yaml").write_text("policies: []\n")
    doc = base()
    doc["policy"] = {"include": ["policies/*.yaml"]}
    (base_dir / "atp.yaml").write_text(yaml.safe_dump(doc))
    snap = config.load(base_dir / "atp.yaml")
    assert [p.id for p in snap.policies.policies] == ["own.deny"]
    assert not any(".p.yaml" in f for f in snap.files)


def test_a_recursive_include_follows_no_link_to_a_directory(tmp_path: Path) -> None:
    # Two links back up (`a -> .`, `b -> .`) had `**` walk for ever: check ran for
    # minutes, and a running serve stopped answering at the reload.
    _policy_file(tmp_path, "own.deny")
    (tmp_path / "policies" / "a").symlink_to(".")
    (tmp_path / "policies" / "b").symlink_to(".")
    doc = base()
    doc["policy"] = {"include": ["policies/**/*.yaml"]}
    path = tmp_path / "atp.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert [p.id for p in config.load(path).policies.policies] == ["own.deny"]


# -- policies that need redaction ---------------------------------------------------

def _with_policy(expression: str, redaction: dict) -> dict:
    doc = base()
    doc["redaction"] = redaction
    doc["policies"] = [{"id": "pii.card", "effect": "deny", "expression": expression}]
    return doc


def test_a_policy_reading_data_classes_needs_redaction_on() -> None:
    expression = "'card' in request.data_classes"
    err = error_of(_with_policy(expression, {"enabled": False}))
    (where, reason), = err.problems
    assert where == "pii.card" and err.lines[0] > 0
    assert str(err).endswith(f"(line {err.lines[0]})")
    assert "request.data_classes" in reason and "redaction" in reason
    assert parse_dict(_with_policy(expression, {"enabled": True})).policies is not None
    assert parse_dict(_with_policy("request.stream", {"enabled": False})).policies is not None


def test_a_redact_policy_may_not_require_a_class_redaction_never_looks_for() -> None:
    # The values of a disabled class pass in clear: the policy could never be met, and
    # loading it would let them reach the provider it guards.
    doc = base()
    doc["redaction"] = {"disabled_classes": ["phone"]}
    doc["policies"] = [{"id": "pii.external", "effect": "redact",
                        "data_classes": ["phone", "email"],
                        "expression": "resource.egress == 'external'"}]
    err = error_of(doc)
    (where, reason), = err.problems
    assert where == "pii.external" and err.lines[0] > 0
    assert "'phone'" in reason and "disabled_classes" in reason and "'email'" not in reason
    doc["redaction"] = {"disabled_classes": ["ipv6"]}
    assert parse_dict(doc).policies is not None


def test_the_readmes_configuration_reference_loads(tmp_path: Path) -> None:
    import re
    import shutil

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuration reference"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    block = block.replace("<printf %s KEY | sha256sum>", ALICE_SHA)
    (tmp_path / "atp.yaml").write_text(block)
    shutil.copytree(EXAMPLE.parent / "policies", tmp_path / "policies")
    snapshot = config.load(tmp_path / "atp.yaml")
    assert snapshot.models and snapshot.routes


def test_a_schema_error_names_the_line_of_the_value() -> None:
    err = error_of("server: {listen: '127.0.0.1:50051'}\nmodels:\n  - name: m\n"
                   "    cluster: c\n    upstream_model: u\n"
                   "    price: {input_per_1k: -1, output_per_1k: 0}\n"
                   "routes: [{name: r, aliases: {a: [m]}}]\n")
    assert err.lines == [6]
    assert str(err).endswith("models[0].price.input_per_1k: Input should be greater than "
                             "or equal to 0 (line 6)")


def test_a_name_that_does_not_resolve_names_its_line() -> None:
    # Checks across the document (unknown model, default, objective names) gave no line.
    err = error_of("auth: {anonymous_tenant: anon}\nmodels:\n  - name: m\n"
                   "    cluster: c\n    upstream_model: u\n"
                   "    price: {input_per_1k: 1, output_per_1k: 0}\n"
                   "routes:\n  - name: r\n    aliases:\n      gpt-4.1:\n        - m\n"
                   "        - nope\n    default: b\n"
                   "    objective: {champion: zz}\n")
    assert err.problems == [
        ("routes[0].aliases.gpt-4.1[1]", "unknown model 'nope'"),
        ("routes[0].default", "'b' is not an alias of this route"),
        ("routes[0].objective.champion", "'zz' is not a candidate of this route")]
    assert err.lines == [12, 13, 14]


def test_a_number_key_is_named_as_a_key_not_a_list_index() -> None:
    # `5:` as an alias was named `aliases[5].[key]`, which reads as a list's sixth item.
    doc = base()
    doc["routes"][0]["aliases"] = {5: doc["routes"][0]["aliases"]["fast"]}
    (path, _), *_ = error_of(doc).problems
    assert path.endswith("aliases.5")


def test_an_invisible_character_in_a_key_or_value_is_shown() -> None:
    # Printed as it is, a pasted zero-width space read as the right key (or value)
    # refused: "server.reload_poll_s: Extra inputs are not permitted".
    text = yaml.safe_dump(base(), sort_keys=False) + \
        "server:\n  \u200breload_poll_s: 1\n  log_level: \"INFO\\xa0\"\n"
    assert error_of(text).problems == [
        ("server.log_level", "Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR', got the "
                             "string 'INFO\\xa0'"),
        ("server.'\\u200breload_poll_s'", "Extra inputs are not permitted")]


def test_a_long_value_refused_is_shown_by_its_start() -> None:
    text = yaml.safe_dump(base(), sort_keys=False) + f"server:\n  log_level: {'x' * 5000}\n"
    ((path, reason),) = error_of(text).problems
    assert path == "server.log_level"
    assert reason.endswith(f"got the string '{'x' * 77}'... (5000 characters)")


def test_a_null_or_true_key_is_named_and_lined_as_the_file_wrote_it() -> None:
    # Pydantic names a null key 'None' and a true key 1: the problems read `None` and
    # `[1]`, and the null key's line was the document's first.
    text = yaml.safe_dump(base(), sort_keys=False) + "null: 1\ntrue: 2\n"
    lines = text.count("\n")
    err = error_of(text)
    assert err.problems == [("null", "expected a string key, got null"),
                            ("true", "expected a string key, got true")]
    assert err.lines == [lines - 1, lines]
    aliases = yaml.safe_dump(base(), sort_keys=False).replace(
        "  aliases:\n", "  aliases:\n    null: [small]\n    1.5: [small]\n", 1)
    err = error_of(aliases)
    first = aliases.splitlines().index("    null: [small]") + 1
    assert err.problems == [("routes[0].aliases.null", "expected a string, got null"),
                            ("routes[0].aliases.1.5", "expected a string, got the number 1.5")]
    assert err.lines == [first, first + 1]

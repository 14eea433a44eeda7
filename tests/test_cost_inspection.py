"""What a cost model says about itself: resources as plain data, the counters each resource
touches, describe(), the source text an override leaves, and the error messages that name
what is wrong (gmemfast.cost; docs/model.md §9 and §10).

Expected values come from the profile files read directly with tomllib, or from small
models built here by hand, never from the output under test.
"""
import tomllib
from importlib import resources as importlib_resources

import pytest

from gmemfast._layout import COUNTER_NAMES
from gmemfast.cost import BUILTIN_PROFILES, CostModel, Resource, format_ns


def profile_tables(name):
    """The [resources.*] tables of a built-in profile file, as tomllib reads them."""
    text = (importlib_resources.files("gmemfast") / "profiles" / f"{name}.toml").read_text("utf-8")
    return tomllib.loads(text).get("resources", {})


# -- resources as plain data -----------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in BUILTIN_PROFILES if profile_tables(n)])
def test_resource_to_dict_gives_back_the_profile_table(name):
    model = CostModel.from_profile(name)
    for rname, table in profile_tables(name).items():
        expected = {"kind": table["kind"], "scope": table.get("scope", "vm"), "what": table.get("what", ""),
                    "source": table["source"].strip(), "counters": list(table.get("counters", []))}
        if table.get("holds"):
            expected["holds"] = {k: float(v) for k, v in table["holds"].items()}
        if "gb_per_s" in table:
            expected["gb_per_s"] = float(table["gb_per_s"])
        if table.get("bytes_each"):
            expected["bytes_each"] = {k: float(v) for k, v in table["bytes_each"].items()}
        got = model.resources[rname].to_dict()
        assert got == expected, (name, rname)
        assert type(got["counters"]) is list


def test_resource_to_dict_leaves_out_what_a_kind_does_not_have():
    serial = Resource("lock", "serial", "host", "estimate: x", counters=("convert_calls",),
                      holds={"rmp_updates": 2.5})
    assert serial.to_dict() == {"kind": "serial", "scope": "host", "what": "", "source": "estimate: x",
                                "counters": ["convert_calls"], "holds": {"rmp_updates": 2.5}}
    bw = Resource("bw", "bandwidth", "vm", "estimate: y", counters=("bytes_copied",), gb_per_s=10.0,
                  bytes_each={"guest_pages_touched": 4096.0})
    assert bw.to_dict() == {"kind": "bandwidth", "scope": "vm", "what": "", "source": "estimate: y",
                            "counters": ["bytes_copied"], "gb_per_s": 10.0,
                            "bytes_each": {"guest_pages_touched": 4096.0}}
    assert type(bw.to_dict()["bytes_each"]) is dict and type(serial.to_dict()["holds"]) is dict


def test_resource_touches_every_named_counter_in_counter_order():
    names = {"tlb_shootdowns", "rmp_updates", "bytes_copied"}
    r = Resource("r", "serial", "vm", "estimate: x", counters=("rmp_updates",),
                 holds={"tlb_shootdowns": 1.0})
    assert set(r.touches()) == {"tlb_shootdowns", "rmp_updates"}
    assert list(r.touches()) == [n for n in COUNTER_NAMES if n in r.touches()]
    b = Resource("b", "bandwidth", "vm", "estimate: x", counters=("bytes_copied",), gb_per_s=1.0,
                 bytes_each={"guest_pages_touched": 8.0})
    assert set(b.touches()) == {"bytes_copied", "guest_pages_touched"}
    assert not set(r.touches()) - names


# -- describe() ------------------------------------------------------------------------------

def two_resource_model():
    lock = Resource("lock", "serial", "host", "estimate: one lock", what="the lock",
                    counters=("convert_calls",), holds={"rmp_updates": 1500.0})
    bw = Resource("bw", "bandwidth", "vm", "estimate: the memory bus", counters=("bytes_copied",),
                  gb_per_s=12.5)
    quiet = Resource("quiet", "shared", "vm", "estimate: read side", counters=("convert_calls",))
    return CostModel("m", {"convert_calls": 100.0, "rmp_updates": 2000.0, "bytes_copied": 0.5},
                     {"convert_calls": "estimate: a", "rmp_updates": "estimate: b", "bytes_copied": "estimate: c"},
                     resources=(lock, bw, quiet))


def test_describe_names_resources_unpriced_counters_and_holds():
    m = two_resource_model()
    lines = m.describe().split("\n")
    assert lines[0] == "cost profile: m"
    i = lines.index(f"convert_calls: {format_ns(100.0)} per conversion ioctl call")
    assert lines[i + 1] == "    source: estimate: a"
    assert lines[i + 2] == "    resources: lock, quiet"
    unpriced = [n for n in COUNTER_NAMES if n not in ("convert_calls", "rmp_updates", "bytes_copied")]
    assert "unpriced: " + ", ".join(unpriced) in lines
    assert "resource lock: serial, one per host: the lock" in lines
    assert "resource bw: bandwidth, one per vm, 12.5 GB/s" in lines
    assert "resource quiet: shared, one per vm" in lines
    assert f"    holds: rmp_updates {format_ns(1500.0)} each" in lines
    assert lines.count("    source: estimate: the memory bus") == 1


def test_describe_of_a_model_that_prices_everything_lists_no_unpriced():
    m = CostModel("all", {n: 1.0 for n in COUNTER_NAMES}, {n: "estimate: x" for n in COUNTER_NAMES},
                  description="every counter")
    lines = m.describe().split("\n")
    assert lines[:2] == ["cost profile: all", "every counter"]
    assert not [line for line in lines if line.startswith("unpriced")]
    assert not [line for line in lines if "resources:" in line]
    assert len(lines) == 2 + 2 * len(COUNTER_NAMES)


# -- overrides -------------------------------------------------------------------------------

def test_override_source_says_what_the_figure_was():
    base = CostModel("m", {"convert_calls": 250.0}, {"convert_calls": "estimate: a"},
                     description="a model", resources=two_resource_model().resources.values())
    changed = base.with_overrides(convert_calls=1.0, rmp_updates=2.0)
    assert changed.sources()["convert_calls"] == "override: set by the caller (profile 'm' had 250.0 ns)"
    assert changed.sources()["rmp_updates"] == "override: set by the caller (unpriced in profile 'm')"
    assert changed.description == "a model"
    assert dict(changed.resources) == dict(base.resources)


def test_bad_override_value_names_the_counter():
    with pytest.raises(ValueError, match="^override convert_calls: a figure must be"):
        CostModel("m", {}, {}).with_overrides(convert_calls=-1.0)
    with pytest.raises(TypeError, match=r"not str \('fast'\)"):
        CostModel("m", {}, {}).with_overrides(convert_calls="fast")
    with pytest.raises(ValueError, match="^overrides: unknown counter name"):
        CostModel("m", {}, {}).with_overrides(bogus=1.0)


# -- error messages --------------------------------------------------------------------------

def test_unknown_counter_message_lists_each_name_once_sorted_whatever_its_type():
    with pytest.raises(ValueError) as err:
        CostModel("m", {}, {}).estimate({"zzz": 1, 7: 1, "guest_exit": 1})
    msg = str(err.value)
    assert msg.startswith("counters: unknown counter name(s) 7, 'guest_exit' (did you mean 'guest_exits'?), 'zzz';")


def test_constructor_messages_name_the_model_and_every_counter():
    assert CostModel("m", {}, {}).description == ""
    with pytest.raises(ValueError, match=r"^cost model 'm': unknown counter name\(s\) 'a', 'b';"):
        CostModel("m", {"a": 1.0}, {"b": "x"})
    with pytest.raises(ValueError, match="^cost model 'm': no source for psmash, tlb_invlpg;"):
        CostModel("m", {"tlb_invlpg": 1.0, "psmash": 1.0}, {})
    with pytest.raises(ValueError, match="^cost model 'm': a source but no figure for psmash, tlb_invlpg$"):
        CostModel("m", {}, {"tlb_invlpg": "x", "psmash": "y"})


RES = '[counters.guest_exits]\nns=1\nsource="x"\n[resources.r]\n'


@pytest.mark.parametrize("text, message", [
    (RES + 'kind="serial"\nsource="x"\ncolour="red"\nsize=2',
     "resources.r: unknown key(s) colour, size; known: bytes_each, counters, gb_per_s, holds, kind, scope, source, what"),
    (RES + 'kind="lock"\nsource="x"', "resources.r: kind must be one of serial, bandwidth, shared, not 'lock'"),
    (RES + 'kind="serial"\nholds=3\nsource="x"', "resources.r.holds must be a table of counter = number, not 3"),
    (RES + 'kind="serial"\nholds={guest_exits=-0.5}\nsource="x"',
     "resources.r.holds.guest_exits must be a finite number >= 0, not -0.5"),
    (RES + 'kind="serial"\nholds={guest_exits="1"}\nsource="x"',
     "resources.r.holds.guest_exits must be a finite number >= 0, not '1'"),
    (RES + 'kind="serial"\nholds={guest_exits=true}\nsource="x"',
     "resources.r.holds.guest_exits must be a finite number >= 0, not True"),
    (RES + 'kind="serial"\nholds={guest_exits=inf}\nsource="x"',
     "resources.r.holds.guest_exits must be a finite number >= 0, not inf"),
    (RES + 'kind="bandwidth"\ngb_per_s=1\nbytes_each={guest_exits=-1}\nsource="x"',
     "resources.r.bytes_each.guest_exits must be a finite number >= 0, not -1"),
    (RES + 'kind="serial"',
     "resources.r has no source: every resource must name a public source or say 'estimate: <reasoning>'"),
    (RES + 'kind="serial"\nwhat=3\nsource="x"', "resources.r: 'what' must be a string, not 3"),
    (RES + 'kind="serial"\ncounters="psmash"\nsource="x"',
     "resources.r: counters must be a list of counter names, not 'psmash'"),
    (RES + 'kind="serial"\ncounters=["psmash", "psmash"]\nsource="x"', "resources.r: a counter is listed twice in counters"),
    (RES + 'kind="bandwidth"\ngb_per_s=0\nsource="x"',
     "resources.r: a bandwidth resource needs gb_per_s, a finite number > 0, not 0"),
    (RES + 'kind="bandwidth"\ngb_per_s=inf\nsource="x"',
     "resources.r: a bandwidth resource needs gb_per_s, a finite number > 0, not inf"),
    (RES + 'kind="bandwidth"\ngb_per_s=1\ncounters=["psmash", "guest_exits", "bytes_copied"]\nsource="x"',
     "resources.r: psmash, guest_exits count(s) no bytes: list them under bytes_each with the bytes of one count"),
    (RES + 'kind="bandwidth"\ngb_per_s=1\nholds={guest_exits=1}\nsource="x"',
     "resources.r: holds is for serial resources"),
    (RES + 'kind="serial"\ngb_per_s=1\nsource="x"', "resources.r: gb_per_s and bytes_each are for bandwidth resources"),
    (RES + 'kind="shared"\nbytes_each={guest_exits=8}\nsource="x"',
     "resources.r: gb_per_s and bytes_each are for bandwidth resources"),
    (RES + 'kind="serial"\ncounters=["psmash", "guest_exits"]\nholds={guest_exits=1, psmash=2}\nsource="x"',
     "resources.r: guest_exits, psmash both held whole (counters) and in part (holds)"),
    (RES + 'kind="serial"\ncounters=[1]\nsource="x"', "resources.r: counters must be a list of counter names, not [1]"),
    (RES + 'kind="serial"\ncounters=["psmash", "bogus"]\nsource="x"', "resources.r: unknown counter name(s) 'bogus'; "
     "`gmemfast counters` lists them with their figures and sources"),
])
def test_bad_resource_message_names_the_value(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        CostModel.from_profile(path)
    assert str(err.value) == f"profile file {str(path)!r}: {message}"


def test_zero_and_fractional_holds_are_figures_and_what_is_optional(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(RES + 'kind="serial"\nholds={guest_exits=0, rmp_updates=0.5}\nsource="x"', encoding="utf-8")
    m = CostModel.from_profile(path)
    r = m.resources["r"]
    assert dict(r.holds) == {"guest_exits": 0.0, "rmp_updates": 0.5}
    assert r.what == ""
    assert "resource r: serial, one per vm" in m.describe().split("\n")
    assert f"    holds: guest_exits {format_ns(0.0)} each, rmp_updates {format_ns(0.5)} each" in m.describe()


def test_constructor_refuses_bad_sources_and_resources_naming_them():
    with pytest.raises(ValueError, match=r"^cost model 'm': the source of psmash must be a non-empty string, not 3$"):
        CostModel("m", {"psmash": 1.0}, {"psmash": 3})
    with pytest.raises(ValueError, match=r"^cost model 'm': the source of psmash must be a non-empty string, not ' '$"):
        CostModel("m", {"psmash": 1.0}, {"psmash": " "})
    with pytest.raises(ValueError, match=r"^cost model 'm': psmash: a figure must be a finite number"):
        CostModel("m", {"psmash": -1.0}, {"psmash": "x"})
    with pytest.raises(TypeError, match=r"^cost model 'm': resources must be Resource objects, not dict$"):
        CostModel("m", {}, {}, resources=[{"name": "r"}])
    r = Resource("r", "shared", "vm", "estimate: x")
    with pytest.raises(ValueError, match=r"^cost model 'm': resource 'r' given twice$"):
        CostModel("m", {}, {}, resources=[r, r])


# -- estimates: operations against the total, order of equal costs ----------------------------

def test_an_operation_counting_a_counter_the_total_lacks_is_refused():
    m = CostModel("m", {"psmash": 10.0, "guest_exits": 1.0}, {"psmash": "x", "guest_exits": "y"})
    with pytest.raises(ValueError) as err:
        m.estimate({"guest_exits": 3}, by_operation={"a": {"psmash": 1, "guest_exits": 3}})
    assert str(err.value) == "the operations count more than the total for psmash (operations 1, total 0)"
    with pytest.raises(ValueError) as err:
        m.estimate({"guest_exits": 3}, by_operation={"a": {"psmash": 2}, "b": {"guest_exits": 4}})
    assert str(err.value) == ("the operations count more than the total for psmash (operations 2, total 0), "
                              "guest_exits (operations 4, total 3)")


def test_a_single_count_no_operation_claims_is_unattributed():
    m = CostModel("m", {"psmash": 10.0, "guest_exits": 1.0}, {"psmash": "x", "guest_exits": "y"})
    e = m.estimate({"guest_exits": 1, "psmash": 5}, by_operation={"a": {"psmash": 5}})
    assert dict(e.by_operation["(unattributed)"].counts) == {"guest_exits": 1}
    assert e.by_operation["(unattributed)"].total_ns == 1.0
    assert dict(e.by_operation["a"].counts) == {"psmash": 5}


def test_counters_of_equal_cost_list_priced_before_unpriced_then_by_name():
    m = CostModel("m", {"psmash": 0.0, "tlb_invlpg": 0.0, "guest_exits": 2.0},
                  {"psmash": "x", "tlb_invlpg": "x", "guest_exits": "x"})
    e = m.estimate({"rmp_updates": 1, "tlb_invlpg": 1, "psmash": 1, "convert_calls": 1, "guest_exits": 1})
    assert list(e.by_counter) == ["guest_exits", "psmash", "tlb_invlpg", "convert_calls", "rmp_updates"]
    assert e.unpriced == ("convert_calls", "rmp_updates")


def test_bad_arguments_to_estimate_name_their_type():
    m = CostModel("m", {}, {})
    with pytest.raises(TypeError, match=r"^counters must be a mapping of counter name to count, not list$"):
        m.estimate([("psmash", 1)])
    with pytest.raises(TypeError, match=r"^by_operation must map operation names to counters, not tuple$"):
        m.estimate(by_operation=(("a", {}),))
    with pytest.raises(TypeError, match=r"^estimate\(\) needs counters, by_operation, or both$"):
        m.estimate()


CNT = '[counters.guest_exits]\nns=1\nsource="x"\n'


@pytest.mark.parametrize("text, message", [
    ('colour=1\nsize=2\n' + CNT, "unknown top-level key(s) colour, size; a profile has a [profile] table, "
     "[counters.<name>] and [resources.<name>] tables"),
    ('profile=3\n' + CNT, "'profile' must be a table, not 3"),
    ('[profile]\nzz=1\naa=2\n' + CNT, "unknown key(s) aa, zz in [profile]; known: name, description, base"),
    ('[profile]\nname=""\n' + CNT, "profile.name must be a non-empty string, not ''"),
    ('[profile]\nname=3\n' + CNT, "profile.name must be a non-empty string, not 3"),
    ('counters=3', "'counters' must be a table of [counters.<name>] tables, not 3"),
    ('resources=3\n' + CNT, "'resources' must be a table of [resources.<name>] tables, not 3"),
    ('[profile]\ndescription=3\n' + CNT, "profile.description must be a string, not 3"),
    ('[profile]\nbase="vax"\n' + CNT,
     "profile.base must name a built-in profile (snp, tdx, sw-protected, snp-genoa, tdx-gnr), not 'vax'"),
    ('[counters.guest_exits]\nns=1\nsource="x"\nfoo=1\nbar=2',
     "counters.guest_exits: unknown key(s) bar, foo; known: ns, gb_per_s, source"),
    ('[counters.guest_exits]\ngb_per_s=1\nsource="x"',
     "counters.guest_exits: gb_per_s is only for byte counters (bytes_copied, bytes_zeroed_1g, bytes_zeroed_2m, "
     "bytes_zeroed_4k, hash_bytes); give 'ns' per guest exit to the host and re-entry instead"),
    ('[counters.bytes_copied]\ngb_per_s="fast"\nsource="x"', "counters.bytes_copied: gb_per_s must be a number, not 'fast'"),
    ('[counters.bytes_copied]\ngb_per_s=true\nsource="x"', "counters.bytes_copied: gb_per_s must be a number, not True"),
])
def test_bad_profile_message_names_the_value(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        CostModel.from_profile(path)
    assert str(err.value) == f"profile file {str(path)!r}: {message}"


def test_a_profile_without_description_has_none(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[profile]\nname="n"\n' + CNT, encoding="utf-8")
    m = CostModel.from_profile(path)
    assert (m.name, m.description) == ("n", "")
    assert m.describe().split("\n")[1] == f"guest_exits: {format_ns(1.0)} per guest exit to the host and re-entry"


def test_a_user_profile_may_start_from_an_alias_and_share_a_built_in_name(tmp_path):
    snp = CostModel.from_profile("snp")
    alias = tmp_path / "mine.toml"
    alias.write_text('[profile]\nbase="snp-milan"\n', encoding="utf-8")
    assert dict(CostModel.from_profile(alias).ns_per_unit) == dict(snp.ns_per_unit)
    # a user's copy saved as snp.toml starting from the built-in snp is no loop
    same = tmp_path / "snp.toml"
    same.write_text('[profile]\nbase="snp"\n[counters.psmash]\nns=1\nsource="x"\n', encoding="utf-8")
    m = CostModel.from_profile(same)
    assert m.name == "snp" and m.ns_per_unit["psmash"] == 1.0
    assert m.ns_per_unit["rmp_updates"] == snp.ns_per_unit["rmp_updates"]


def test_what_counts_as_a_profile_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("missing.toml", str(tmp_path / "dir" / "profile"), f"dir{__import__('os').sep}p"):
        with pytest.raises(FileNotFoundError):
            CostModel.from_profile(missing)
    (tmp_path / "plain").write_text(CNT, encoding="utf-8")       # no suffix, no folder: it exists
    assert CostModel.from_profile("plain").name == "plain"
    with pytest.raises(ValueError, match="^unknown cost profile 'plane': use one of snp, "):
        CostModel.from_profile("plane")
    with pytest.raises(TypeError, match=r"^a profile is a built-in name or a path, not int \(3\)$"):
        CostModel.from_profile(3)


def test_a_profile_file_may_start_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + ('[profile]\nname="bom"\n' + CNT).encode("utf-8"))
    m = CostModel.from_profile(path)
    assert m.name == "bom" and m.ns_per_unit["guest_exits"] == 1.0

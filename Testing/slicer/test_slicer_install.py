"""The first Segment click on a fresh Slicer (issue 25, section 5): what is installed, shown in the panel.

MetaSegLib.install plans the steps (PyTorch without torchvision; its CPU build where there is no NVIDIA GPU),
reads pip's output into the panel's progress, and writes the offline recipe: a `pip download` for another
computer that fetches *this* computer's wheels. The recipe is checked with pip's own option parser and its
own wheel-tag logic (the pip of this environment), for Slicer's Python 3.9 (5.6, 5.8) and 3.12 (5.10) on
each operating system, against the file names of real wheels.
"""
from __future__ import annotations

import sys
import textwrap

import pytest

from mrml_helpers import SAMPLE_T1
from MetaSegLib import dependencies, install

MISSING_TORCH = dependencies.Problem("torch>=2.0", None)
MISSING_SMALL = [dependencies.Problem("slicerio>=1.0", None), dependencies.Problem("deepbet==1.0.2", None)]


def all_args(steps):
    return [a for s in steps for a in s.args]


def test_plan_installs_no_torchvision_and_the_cpu_build_without_an_nvidia_gpu():
    cpu = install.plan([MISSING_TORCH] + MISSING_SMALL, cuda=False, system="Linux")
    assert [s.args[:2] for s in cpu] == [("pip", "install"), ("pip", "install")]
    assert cpu[0].args[2] == "torch>=2.0" and install.TORCH_CPU_INDEX in cpu[0].args and "CPU build" in cpu[0].what
    assert cpu[1].requirements == ("slicerio>=1.0", "deepbet==1.0.2") and cpu[1].size == install.SIZES["small"]
    cuda = install.plan([MISSING_TORCH], cuda=True, system="Windows")
    assert [s.args for s in cuda] == [("pip", "install", install.LIGHT_THE_TORCH),
                                      ("light_the_torch", "install", "torch>=2.0")]  # only torch: no torchvision
    assert install.plan([MISSING_TORCH], cuda=True, system="Linux", have_light_the_torch=True)[0].args[0] == \
        "light_the_torch"
    mac = install.plan([MISSING_TORCH], cuda=False, system="Darwin", raw_progress=True)
    assert mac[0].args == ("pip", "install", "torch>=2.0", "--progress-bar", "raw")  # PyPI's macOS wheels
    for steps in (cpu, cuda, mac):
        assert not any("torchvision" in a for a in all_args(steps))
        assert all(s.size for s in steps)
    assert install.plan([dependencies.Problem("torch>=2.0", "1.13.1")], cuda=False) == []  # never replaced silently
    text = install.describe_plan(cpu)
    assert "about 200 MB" in text and "deepbet" in text and "Cancel" in text


def test_nvidia_gpu_is_found_by_nvidia_smi_only():
    class Out:
        def __init__(self, rc, out):
            self.returncode, self.stdout = rc, out

    assert install.has_cuda_gpu(which=lambda name: None) is False
    found = install.has_cuda_gpu(which=lambda name: "/usr/bin/nvidia-smi", run=lambda *a, **k: Out(0, "NVIDIA H100\n"))
    assert found is (sys.platform != "darwin")
    assert install.has_cuda_gpu(which=lambda name: "/usr/bin/nvidia-smi", run=lambda *a, **k: Out(9, "")) is False
    assert install.pip_supports_raw_progress("24.1") and not install.pip_supports_raw_progress("23.2.1")


def test_pips_lines_become_the_panels_progress():
    lines = ["Collecting torch>=2.0",
             "  Downloading https://download.pytorch.org/whl/cpu/torch-2.5.1%2Bcpu-cp39-cp39-linux_x86_64.whl (174.7 MB)",
             "Progress 0 of 174700000", "Progress 87350000 of 174700000 bytes",
             "Installing collected packages: torch", "Successfully installed torch-2.5.1+cpu",
             "Requirement already satisfied: numpy in ./lib"]
    events = [install.pip_event(x) for x in lines]
    assert [e and e["what"] for e in events] == ["collecting", "downloading", "bytes", "bytes", "installing",
                                                 "installed", None]
    assert events[1]["file"] == "torch-2.5.1+cpu-cp39-cp39-linux_x86_64.whl" and events[1]["size"] == "174.7 MB"
    step = install.plan([MISSING_TORCH], cuda=False, system="Linux")[0]
    state = {}
    texts = [install.progress_text(step, e, state) for e in events if e is not None]
    assert texts[1][0].endswith("downloading torch-2.5.1+cpu-cp39-cp39-linux_x86_64.whl (174.7 MB)")
    assert texts[3] == (f"Installing {step.what}: downloading torch-2.5.1+cpu-cp39-cp39-linux_x86_64.whl — 87 of "
                        "175 MB", 0.5)


# real wheels: (file name, Python, system, machine, macOS version) that the recipe must fetch
WHEELS = [
    ("torch-2.5.1-cp39-cp39-manylinux1_x86_64.whl", "3.9", "Linux", "x86_64", None),
    ("torch-2.5.1+cpu-cp39-cp39-linux_x86_64.whl", "3.9", "Linux", "x86_64", None),
    ("torch-2.6.0+cpu-cp312-cp312-manylinux_2_28_x86_64.whl", "3.12", "Linux", "x86_64", None),
    ("torch-2.5.1+cpu-cp39-cp39-win_amd64.whl", "3.9", "Windows", "AMD64", None),
    ("torch-2.6.0+cpu-cp312-cp312-win_amd64.whl", "3.12", "Windows", "AMD64", None),
    ("torch-2.5.1-cp39-none-macosx_11_0_arm64.whl", "3.9", "Darwin", "arm64", "14.4"),
    ("torch-2.6.0-cp312-none-macosx_11_0_arm64.whl", "3.12", "Darwin", "arm64", "14.4"),
    ("torch-2.2.2-cp39-none-macosx_10_9_x86_64.whl", "3.9", "Darwin", "x86_64", "12.7"),
    ("numpy-1.26.4-cp39-cp39-macosx_11_0_arm64.whl", "3.9", "Darwin", "arm64", "14.4"),
    ("numpy-2.1.3-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "3.12", "Linux", "x86_64", None),
    ("SimpleITK-2.4.0-cp311-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "3.12", "Linux", "x86_64", None),
    ("SimpleITK-2.4.0-cp311-abi3-win_amd64.whl", "3.12", "Windows", "AMD64", None),
    ("deepbet-1.0.2-py3-none-any.whl", "3.9", "Windows", "AMD64", None),
    ("slicerio-1.1.2-py3-none-any.whl", "3.12", "Darwin", "arm64", "14.4"),
]
# and wheels it must not fetch: another Python, another system or processor
NOT = [
    ("torch-2.5.1-cp311-cp311-manylinux1_x86_64.whl", "3.9", "Linux", "x86_64", None),
    ("torch-2.5.1-cp39-cp39-manylinux1_x86_64.whl", "3.12", "Linux", "x86_64", None),
    ("torch-2.5.1-cp39-none-macosx_11_0_arm64.whl", "3.9", "Darwin", "x86_64", "12.7"),
    ("torch-2.5.1+cpu-cp39-cp39-win_amd64.whl", "3.9", "Linux", "x86_64", None),
]


def target_tags(args):
    """The wheel tags that `pip download` with these arguments accepts, by pip's own code (its option parser,
    its check of the target options, and its TargetPython)."""
    pytest.importorskip("pip")
    from pip._internal.cli import cmdoptions
    from pip._internal.commands import create_command

    assert args[:2] == ["pip", "download"]
    command = create_command("download")
    options, _ = command.parse_args(args[2:])
    cmdoptions.check_dist_restriction(options)  # the combination pip insists on (as `pip download` checks it)
    return set(cmdoptions.make_target_python(options).get_tags())


@pytest.mark.parametrize("wheel,python,system,machine,mac", WHEELS + NOT, ids=[w[0] + "@" + w[1] + w[2] for w in WHEELS + NOT])
def test_the_offline_recipe_fetches_the_wheels_of_this_computer(wheel, python, system, machine, mac):
    from pip._vendor.packaging.utils import parse_wheel_filename

    requirements = ["torch>=2.0", "numpy>=1.21", "SimpleITK>=2.2", "slicerio>=1.0", "deepbet==1.0.2"]
    args, install_line = install.offline_recipe(requirements, python_version=python, system=system, machine=machine,
                                                mac_version=mac)
    assert "torchvision" not in " ".join(args) and "--only-binary=:all:" in args
    assert ("--index-url" in args) == (system != "Darwin")  # no NVIDIA GPU: PyTorch's CPU index, where it has one
    wanted = (wheel, python, system, machine, mac) in WHEELS
    assert bool(parse_wheel_filename(wheel)[3] & target_tags(args)) == wanted
    assert install_line.startswith('slicer.util.pip_install("--no-index --find-links=')


def test_the_printed_recipe_is_one_shell_line_that_pip_parses():
    import shlex

    text = install.offline_text(["torch>=2.0", "deepbet==1.0.2"], python_version="3.9", system="Linux",
                                machine="x86_64")
    line = text.splitlines()[1].strip()
    args = shlex.split(line)
    assert target_tags(args)  # pip takes the printed line as it is
    assert "'torch>=2.0'" in line  # quoted for the shell (> would redirect)


FAKE_PIP = '''
import sys, time
args = sys.argv[1:]
print("Collecting deepbet==1.0.2", flush=True)
print("  Downloading deepbet-1.0.2-py3-none-any.whl (17.4 MB)", flush=True)
if "--fail" in args:
    print("ERROR: Could not find a version that satisfies the requirement deepbet==1.0.2", file=sys.stderr, flush=True)
    sys.exit(1)
for done in range(0, 17400001, 4350000):
    print(f"Progress {done} of 17400000 bytes", flush=True)
    time.sleep(0.3)
print("Installing collected packages: deepbet", flush=True)
print("Successfully installed deepbet-1.0.2", flush=True)
open(sys.argv[-1], "w").write("installed")
'''


def fake_install(tmp_path, monkeypatch, fail=False):
    """A missing deepbet, and an install step that runs a pip stand-in (fake_pip.py: prints what pip prints) through
    the PythonSlicer launcher; once it has run, deepbet counts as installed."""
    (tmp_path / "fake_pip.py").write_text(textwrap.dedent(FAKE_PIP))
    marker = tmp_path / "installed"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(dependencies, "check", lambda *a, **k: [] if marker.exists() else [MISSING_SMALL[1]])
    step = install.Step("deepbet (finds the brain in a whole-head scan)", "about 40 MB",
                        ("fake_pip", "install", "deepbet==1.0.2", *(["--fail"] if fail else []), str(marker)),
                        ("deepbet==1.0.2",))
    monkeypatch.setattr(install, "plan", lambda *a, **k: [step])
    return marker


@pytest.fixture
def panel_env(slicer_core):
    from slicer_gui import qt_unavailable_reason

    reason = qt_unavailable_reason()
    if reason:
        pytest.skip(reason)


def test_the_install_is_shown_in_the_panel_and_the_segmentation_follows(scene, tmp_path, monkeypatch, panel_env):
    from slicer_gui import Panel
    from test_slicer_panel_runs import add_volume

    fake_install(tmp_path, monkeypatch)
    with Panel(tmp_path, scene, main_window=True) as panel:
        ui, widget = panel.ui, panel.widget
        ui.inputSelector.setCurrentNode(add_volume(scene, SAMPLE_T1, "slice"))
        ui.stepsSpinBox.value = 3
        seen = []
        original = widget.onInstallProgress

        def recorded(step, event):
            original(step, event)
            seen.append((ui.statusLabel.text, ui.progressBar.value, ui.segmentButton.text))

        widget.onInstallProgress = recorded
        panel.answers.append("OK")
        ui.segmentButton.click()
        [confirm] = panel.message_boxes
        assert "deepbet" in confirm["text"] and "about 40 MB" in confirm["text"] and confirm["pressed"] == "OK"
        assert ui.segmentButton.text == "Cancel" and not ui.progressBar.isHidden()
        panel.pump(lambda: ui.statusLabel.text.startswith("Done in") or ui.statusLabel.text.startswith("Fail"),
                   timeout=600, what="the install and the segmentation")
        texts = [t for t, _, _ in seen]
        assert any("downloading deepbet-1.0.2-py3-none-any.whl (17.4 MB)" in t for t in texts), texts
        assert any("of 17 MB" in t for t in texts) and max(v for _, v, _ in seen) == 100
        assert all(b == "Cancel" for _, _, b in seen)
        assert ui.statusLabel.text.startswith("Done in"), ui.statusLabel.text


def test_a_failed_install_says_how_to_install_offline(scene, tmp_path, monkeypatch, panel_env):
    from slicer_gui import Panel
    from test_slicer_panel_runs import add_volume

    fake_install(tmp_path, monkeypatch, fail=True)
    with Panel(tmp_path, scene, main_window=True) as panel:
        ui, widget = panel.ui, panel.widget
        ui.inputSelector.setCurrentNode(add_volume(scene, SAMPLE_T1, "slice"))
        panel.answers += ["OK", "Close"]
        ui.segmentButton.click()
        panel.pump(lambda: widget._install is None, timeout=120, what="the failed install")
        confirm, failed = panel.message_boxes
        assert "could not install deepbet" in failed["text"] and "pip download" in failed["text"]
        assert "--python-version" in failed["text"] and "Could not find a version" in failed["details"]
        assert widget._job is None and ui.segmentButton.text == "Segment"

import subprocess
import sys


def test_public_api_is_sorted_complete_and_import_is_light():
    code = (
        "import sys, builtins\n"
        "opened = []\n"
        "real_open = builtins.open\n"
        "builtins.open = lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1]\n"
        "import memit_adapter as m\n"
        "assert m.__all__ == sorted(m.__all__), m.__all__\n"
        "missing = [n for n in m.__all__ if not hasattr(m, n)]\n"
        "assert not missing, missing\n"
        "assert 'matplotlib' not in sys.modules and 'datasets' not in sys.modules\n"
        "demo = sorted(n for n in sys.modules if n.startswith('memit_adapter.demo'))\n"
        "assert not demo, demo  # the demo worlds are not part of the library\n"
        "assert not [n for n in m.__all__ if 'world' in n.lower()], m.__all__\n"
        "mine = [f for f in opened if 'memit_adapter' in f and not f.endswith('.py')]  # assets, cards\n"
        "assert not mine, mine\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

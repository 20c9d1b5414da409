"""Deprecated: renamed to ``recipes/tokenize_dataset.py`` (same options); this name goes in the next release.

It was named like the standard library's ``tokenize`` module, which Python finds here first when it
runs any script of this folder (``torch`` imports it through ``inspect``). Until it is removed, this
file runs the new recipe with a deprecation message when it is run as a script, and hands the real
``tokenize`` module over when it is imported, so no recipe needs a ``sys.path`` workaround.
"""

import importlib.util
import os
import sys
import sysconfig

_HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    import runpy

    print("recipes/tokenize.py is deprecated and goes in the next release: run recipes/tokenize_dataset.py "
          "(same options)", file=sys.stderr, flush=True)
    runpy.run_path(os.path.join(_HERE, "tokenize_dataset.py"), run_name="__main__")
else:  # imported as the standard library's tokenize: load the real module in this one's place
    _spec = importlib.util.spec_from_file_location(__name__, os.path.join(sysconfig.get_path("stdlib"), "tokenize.py"))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)

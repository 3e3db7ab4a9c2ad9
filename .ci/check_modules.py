"""Checks on the exported package that notebooks can't make: course order is import order (no module imports a
module of a later notebook, function-level imports included), and every module imports and runs on its own, outside
its notebook's namespace."""
import ast, re, subprocess, sys
from pathlib import Path

pkg = Path(__file__).resolve().parent.parent/'rbn'

def notebook_of(py):
    "The number of the notebook a generated module comes from (None for hand-written files)"
    m = re.search(r'File to edit: (?:\.\./)+nbs/(\d+)_', py.read_text())
    return int(m.group(1)) if m else None

def rbn_imports(py):
    "Names of the rbn modules that `py` imports anywhere in its code ('running', 'course.data', ...)"
    here = py.parent.relative_to(pkg).parts                 # () for rbn/, ('course',) for rbn/course/
    out = set()
    def add(dotted):                                         # a module path inside rbn: keep the known module names
        parts = dotted.split('.')
        for k in (2, 1):
            if '.'.join(parts[:k]) in modules: out.add('.'.join(parts[:k])); return
    for node in ast.walk(ast.parse(py.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level:                                   # relative: resolve against the module's package
                base = list(here[:len(here) - (node.level - 1)]) if node.level > 1 else list(here)
                if mod: add('.'.join(base + [mod]))
                else: [add('.'.join(base + [a.name])) for a in node.names]
            elif mod == 'rbn': [add(a.name) for a in node.names]
            elif mod.startswith('rbn.'): add(mod[4:])
        elif isinstance(node, ast.Import):
            [add(a.name[4:]) for a in node.names if a.name.startswith('rbn.')]
    return out

modules = {'.'.join(p.relative_to(pkg).with_suffix('').parts): p for p in pkg.rglob('*.py')
           if p.stem not in ('__init__', '_modidx')}
errors = []
for name, py in sorted(modules.items()):
    nb = notebook_of(py)
    for dep in sorted(rbn_imports(py)):
        if dep in modules and nb is not None and (dn := notebook_of(modules[dep])) is not None and dn > nb:
            errors.append(f"rbn.{name} (notebook {nb:02d}) imports rbn.{dep} (notebook {dn:02d}), a later notebook")
for name in sorted(modules):
    r = subprocess.run([sys.executable, '-c', f'import rbn.{name}'], capture_output=True, text=True)
    if r.returncode: errors.append(f"import rbn.{name} on its own failed:\n{r.stderr[-2000:]}")

smoke = '''
import matplotlib; matplotlib.use("Agg")
import torch
from torch import nn
import rbn
from rbn.course.data import get_dls
from rbn.course.learner import train_cnn
torch.manual_seed(0)
x, y = torch.randn(64, 28, 28), torch.randint(0, 10, (64,))
for norm in (rbn.RunningBatchNorm, rbn.SkippingRunningBatchNorm):
    r = train_cnn(norm, bs=4, lr=0.05, dls=get_dls(x, y, x[:16], y[:16], bs=4, seed=0), progress=False)
    r["recorder"].plot()
    assert not r["diverged"], norm
model = rbn.convert_to_rbn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
assert isinstance(model[1], rbn.RunningBatchNorm)
print("smoke: ok")
'''
r = subprocess.run([sys.executable, '-c', smoke], capture_output=True, text=True)
if r.returncode: errors.append(f"smoke run of the package failed:\n{r.stderr[-3000:]}")
print('\n'.join(errors) if errors else f"modules: {len(modules)} checked, course order respected, each imports and runs on its own")
sys.exit(1 if errors else 0)

"""invsort's library: the kernel (errors, records, settings, progress) and the job service (``sorting``) at the
root, the layers in sub-packages (``io`` < ``models`` < ``inference`` < ``evaluation`` < ``training``; ``bench``
on top). The README's Architecture section says which may import which; ``tests/test_architecture.py`` checks it.
"""

#!/usr/bin/env python3
# Peak RSS of the *guest* of a 32-bit qemu-user run.  /proc/self/status inside
# the guest is qemu's own (code + TCG buffers + guest): 15-25 MB too high.  qemu
# is started with a fixed guest base (-B) and the Rss of the host mappings that
# lie in [base, base + 4 GiB) is summed from /proc/<qemu>/smaps every few ms.
# Checked against the kernel: same i686 binary native VmHWM 9.3-9.5 MB, this
# method under qemu-i386 9.05 MB.  (From ../shared/tools/cross-arm.md section 3;
# this copy adds --mark, SIGTERM/SIGINT forwarding and PDEATHSIG for qemu.)
#
# usage: guest-rss.py [--interval-ms N] [--duration S] [--mark S] [--report FILE] [--breakdown] -- qemu-arm ARGS...
#   --duration S  terminate qemu after S seconds
#   --report FILE append the GUEST_RSS lines to FILE too (stderr may be a log)
#   --mark S      also report the peak of the first S seconds and the RSS at S
#                 (e.g. a daemon connected and idle) as GUEST_RSS_MARK
# SIGTERM/SIGINT are passed on to qemu (the guest's handler runs), and qemu
# dies with this script (PR_SET_PDEATHSIG), so it can stand in for the binary.
import ctypes, signal, subprocess, sys, time
report = None
def out(line):
    print(line, file=sys.stderr, flush=True)
    if report:
        with open(report, "a") as f: print(line, file=f)
args = sys.argv[1:]; interval = 0.005; base = 0x100000000000; duration = None; breakdown = False; mark = None
while args and args[0] != "--":
    if args[0] == "--interval-ms": interval = float(args[1]) / 1000; args = args[2:]
    elif args[0] == "--duration": duration = float(args[1]); args = args[2:]
    elif args[0] == "--report": report = args[1]; args = args[2:]
    elif args[0] == "--mark": mark = float(args[1]); args = args[2:]
    elif args[0] == "--breakdown": breakdown = True; args = args[1:]
    else: sys.exit("bad option " + args[0])
cmd = args[1:]
if not cmd: sys.exit("usage: guest-rss.py [opts] -- qemu-arm ...")
cmd = [cmd[0], "-B", hex(base)] + cmd[1:]
end = base + (1 << 32)
def pre():
    libc = ctypes.CDLL(None)
    libc.prctl(41, 1, 0, 0, 0)               # PR_SET_THP_DISABLE: no THP on a real ARMv5/v6 device
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG
p = subprocess.Popen(cmd, preexec_fn=pre); t0 = time.monotonic()
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda sig, _f: p.send_signal(sig))
peak = dict(rss=0, anon=0, file=0, per={}); qpeak = 0; marked = False
while p.poll() is None:
    try:
        lines = open(f"/proc/{p.pid}/smaps").read().splitlines()
        qpeak = max(qpeak, next(int(l.split()[1]) for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS:")))
    except (OSError, StopIteration):
        break
    rss = anon = fil = 0; per = {}; inside = False; name = ""
    for l in lines:
        head = l.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-")); parts = l.split()
            inside = lo >= base and hi <= end
            name = parts[5] if len(parts) >= 6 else "[anon]"
        elif inside and head == "Rss:":
            kb = int(l.split()[1]); rss += kb; per[name] = per.get(name, 0) + kb
            if name.startswith("/"): fil += kb
            else: anon += kb
    if rss > peak["rss"]: peak = dict(rss=rss, anon=anon, file=fil, per=per)
    now = time.monotonic() - t0
    if mark is not None and not marked and now >= mark:
        marked = True
        out(f"GUEST_RSS_MARK at_s={mark:g} now_kB={rss} peak_so_far_kB={peak['rss']}")
    if duration is not None and now > duration:
        p.terminate(); duration = None
    time.sleep(interval)
rc = p.wait()
if peak["rss"] == 0:
    print("WARNING: the program ended before a sample was taken (it runs < ~5 ms); "
          "make it pause at the point to measure, e.g. sleep before exit", file=sys.stderr)
if breakdown:
    for k, v in sorted(peak["per"].items(), key=lambda kv: -kv[1]):
        if v: print(f"  {v:8d} kB  {k}", file=sys.stderr)
out(f"GUEST_RSS peak_kB={peak['rss']} (anon_mappings={peak['anon']} file_mappings={peak['file']}) "
    f"qemu_process_peak_kB={qpeak} rc={rc}")
sys.exit(rc if rc >= 0 else 128 - rc)

# Holds N plain session connections to a running wsproxy for HOLD seconds
# and prints wsproxy's and Redis's CPU (/proc/PID/stat, INFO cpu): per
# connect, and per connection per second held (its heartbeats). Run by
# bench/idle-cpu.sh; the package's venv has websockets and redis:
#   clients/python/.venv/bin/python bench/idle-cpu.py N WS_URL REDIS_URL WSPROXY_PID HOLD_SECS
import asyncio, os, sys, time
import redis.asyncio as aioredis
import websockets

N = int(sys.argv[1]); WS = sys.argv[2]; RURL = sys.argv[3]; PID = int(sys.argv[4]); HOLD = float(sys.argv[5])
TICK = os.sysconf("SC_CLK_TCK")

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK

async def rcpu(r):
    i = await r.info("cpu")
    return i["used_cpu_sys"] + i["used_cpu_user"]

async def main():
    r = aioredis.Redis.from_url(RURL)
    rpid = (await r.info("server"))["process_id"]
    p = r.pipeline()
    for i in range(N):
        p.setex(f"session:h{i}:auth", 600, "tok")
    await p.execute()
    c0, r0, t0 = cpu(PID), cpu(rpid), time.time()
    conns = []
    sem = asyncio.Semaphore(200)
    async def one(i):
        async with sem:
            conns.append(await websockets.connect(f"{WS}/a/ws/h{i}?access_token=tok", ping_interval=None, max_queue=4))
    await asyncio.gather(*(one(i) for i in range(N)))
    c1, r1, t1 = cpu(PID), cpu(rpid), time.time()
    print(f"connect {N}: {t1-t0:.1f} s; wsproxy {1e6*(c1-c0)/N:.0f} us/connect; redis {1e6*(r1-r0)/N:.0f} us/connect")
    await asyncio.sleep(3)
    c2, r2, t2 = cpu(PID), cpu(rpid), time.time()
    await asyncio.sleep(HOLD)
    c3, r3, t3 = cpu(PID), cpu(rpid), time.time()
    el = t3 - t2
    print(f"held {N} for {el:.1f} s: wsproxy {c3-c2:.2f} s CPU ({1e6*(c3-c2)/N/el:.2f} us per connection per second); redis {r3-r2:.2f} s")
    open_ = sum(1 for c in conns if c.state.name == "OPEN")
    print(f"still open: {open_}")
    for c in conns:
        c.transport.abort()
    await r.aclose()

asyncio.run(main())

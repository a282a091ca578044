//! Scenario 11, the MCP server's round trip: the same `run_code` on a live WASI session through
//! the Python API (`Sandbox.run_code`) and through `dormant-mcp` over stdio (an MCP `tools/call`
//! from the `mcp` SDK's client, which starts the server as a subprocess), alternating call by
//! call in one Python process started with `--python`.

use crate::Res;
use crate::ctx::Ctx;
use crate::workloads::python_numbers;

/// Prints `api_median_s mcp_median_s n`: each call times `run_code` of the same cell on a
/// sandbox of its own, the API's held in this process, the MCP one held by the server.
const PY_SIDE: &str = r#"
import statistics, sys, time
import anyio
import dormant
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

store, n = sys.argv[1], int(sys.argv[2])
CODE = "counter += 1\nprint(counter)"

async def main():
    sb = dormant.Sandbox.create("wasi", store=store, idle_standby=None)
    sb.run_code("counter = 0")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "dormant.mcp", "--store", store, "--idle-standby", "0"],
    )
    api, mcp = [], []
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            r = await s.call_tool("create_sandbox", {"tier": "wasi"})
            sid = r.structured_content["sandbox_id"]
            await s.call_tool("run_code", {"sandbox_id": sid, "code": "counter = 0"})
            for i in range(n + 2):
                t = time.perf_counter()
                out = sb.run_code(CODE).stdout
                dt_api = time.perf_counter() - t
                assert out == f"{i + 1}\n", out
                t = time.perf_counter()
                r = await s.call_tool("run_code", {"sandbox_id": sid, "code": CODE})
                dt_mcp = time.perf_counter() - t
                assert not r.is_error and r.structured_content["stdout"] == f"{i + 1}\n", r
                if i >= 2:  # the first calls warm both paths up
                    api.append(dt_api)
                    mcp.append(dt_mcp)
            await s.call_tool("kill_sandbox", {"sandbox_id": sid})
    sb.kill()
    print(statistics.median(api), statistics.median(mcp), len(api))

anyio.run(main)
"#;

pub fn run(cx: &mut Ctx) -> Res<()> {
    cx.report.section(
        "11. MCP round trip of run_code",
        "One small `run_code` cell (`counter += 1; print(counter)`) on a running WASI session, \
         through the Python API (`Sandbox.run_code` in the Python process) and through the MCP \
         server (`dormant-mcp` over stdio, a `tools/call` of `run_code` from the `mcp` SDK's \
         client in the same Python process, the sandbox held by the server): from the call to \
         its result. The two alternate call by call; medians.",
    );
    let Some(py) = &cx.opts.python else {
        cx.report.note(
            "Skipped: no Python with the dormant module (`--python`; scripts/bench.sh sets it up).",
        );
        return Ok(());
    };
    let n = if cx.opts.quick { 20 } else { 100 };
    let v = python_numbers(
        py,
        PY_SIDE,
        &[&cx.opts.store.display().to_string(), &n.to_string()],
        3,
        "MCP scenario",
    )?;
    let (api, mcp, samples) = (v[0], v[1], v[2]);
    let ms = |s: f64| format!("{:.2} ms", s * 1e3);
    cx.report.table(
        &["", "Python API", "MCP (stdio)", "MCP − API", "n"],
        &[vec![
            "run_code → result".into(),
            ms(api),
            ms(mcp),
            format!("{:+.2} ms", (mcp - api) * 1e3),
            format!("{samples}"),
        ]],
    );
    cx.report.headline(
        "run_code through MCP vs the Python API",
        format!("{} vs {} ({:+.2} ms)", ms(mcp), ms(api), (mcp - api) * 1e3),
        "scenario 11",
    );
    Ok(())
}

// The dashboard in headless Chromium, as a user would use it: log in with the token, launch an
// instance, see it turn running, open its console and type a command, see its CPU and memory
// graphs, stop it, delete it.
// Usage: node dashboard.mjs URL TOKEN NAME     (playwright-core on NODE_PATH; Debian's chromium)
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const [url, token, name] = process.argv.slice(2);
const step = (text) => console.log(`browser: ${text}`);

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = await browser.newPage();
const errors = [];
page.on("pageerror", (e) => errors.push(e.message));
try {
  await page.goto(url);
  step("login with a wrong token is refused");
  await page.fill("#token", "not-the-token");
  await page.click("#login");
  await page.waitForSelector("#login-error:not(:empty)", { timeout: 10000 });
  step("login");
  await page.fill("#token", token);
  await page.click("#login");
  await page.waitForSelector("#instances", { state: "visible", timeout: 10000 });
  await page.waitForSelector("#hosts .host", { timeout: 10000 });

  step(`launch ${name}`);
  await page.fill("#launch-name", name);
  await page.click("#launch");
  const state = `tr[data-instance="${name}"] td.state`;
  await page.waitForSelector(state, { timeout: 10000 });
  await page.waitForFunction(
    (sel) => document.querySelector(sel)?.textContent.trim() === "running",
    state,
    { timeout: 300000, polling: 500 },
  );
  step(`${name} is running`);

  step("console");
  await page.click(`tr[data-instance="${name}"] button.console`);
  await page.waitForSelector("#console-panel", { state: "visible" });
  // The console answers once its socket is attached; repeat the command until it shows up.
  let seen = false;
  for (let attempt = 0; attempt < 20 && !seen; attempt++) {
    await page.fill("#console-input", "echo from-the-browser-$((6 * 7))");
    await page.press("#console-input", "Enter");
    try {
      await page.waitForFunction(
        () => document.querySelector("#console").textContent.includes("from-the-browser-42"),
        null,
        { timeout: 5000 },
      );
      seen = true;
    } catch {}
  }
  if (!seen) throw new Error("the command's output never appeared in the console");
  await page.click("#console-close");

  step("metrics graphs");
  await page.click(`tr[data-instance="${name}"] td.name`); // a click on the row graphs it
  await page.waitForFunction(
    () => /\d %$/.test(document.querySelector("#cpu-value").textContent.trim())
      && /\d MiB$/.test(document.querySelector("#mem-value").textContent.trim()),
    null,
    { timeout: 30000, polling: 500 },
  );
  // Each canvas holds a line in its colour (not only the grid and labels).
  const lines = await page.evaluate(() => [["cpu-graph", [37, 99, 235]], ["mem-graph", [22, 163, 74]]].map(([id, rgb]) => {
    const canvas = document.getElementById(id);
    const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let near = 0;
    for (let i = 0; i < pixels.length; i += 4) {
      const d = Math.abs(pixels[i] - rgb[0]) + Math.abs(pixels[i + 1] - rgb[1]) + Math.abs(pixels[i + 2] - rgb[2]);
      if (pixels[i + 3] > 200 && d < 60) near += 1;
    }
    return near;
  }));
  if (!(lines[0] > 0 && lines[1] > 0)) throw new Error(`graphs without lines (pixels of their colour: ${lines})`);

  step(`stop ${name}`);
  await page.click(`tr[data-instance="${name}"] button.stop`);
  await page.waitForFunction(
    (sel) => document.querySelector(sel)?.textContent.trim() === "stopped",
    state,
    { timeout: 120000, polling: 500 },
  );

  step(`delete ${name}`);
  const del = `tr[data-instance="${name}"] button.delete`;
  await page.click(del);
  // A second click confirms, where the page asks for one.
  if (await page.locator(del).count()) {
    await page.click(del).catch(() => {});
  }
  await page.waitForSelector(`tr[data-instance="${name}"]`, { state: "detached", timeout: 120000 });
  step("events show the instance's history");
  await page.waitForSelector(`#events :text("${name}")`, { timeout: 10000 });
  if (errors.length) throw new Error(`page errors: ${errors.join("; ")}`);
  step("ok");
} catch (e) {
  await page.screenshot({ path: `${process.env.SCREENSHOT_DIR || "/tmp"}/dashboard-failure.png`, fullPage: true }).catch(() => {});
  console.error(`browser: FAILED: ${e.message}`);
  await browser.close();
  process.exit(1);
}
await browser.close();

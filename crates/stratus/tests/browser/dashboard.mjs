// The dashboard in headless Chromium, as a user would use it: log in with the token, launch an
// instance, see it turn running, open its console and type a command, delete it.
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

// End-to-end test of the web demo (GET / on the public listener) in Debian's Chromium, headless,
// driven by playwright-core. Two pages log in as two friends and chat; screenshots go to
// $IMGATE_SCREENSHOTS (default target/screenshots).
//
// Run: IMGATE_BIN=target/release/imgate node --test tests/browser/demo.test.mjs
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import readline from "node:readline";
import { chromium } from "playwright-core";

const BIN = process.env.IMGATE_BIN || "target/release/imgate";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.IMGATE_SCREENSHOTS || "target/screenshots";
const TIMEOUT = 15_000;

let server;
let baseUrl;
let adminUrl;
let browser;
const scratch = mkdtempSync(path.join(tmpdir(), "imgate-browser-"));

/** Starts `imgate serve --dev` (on port 0 unless given) and resolves with its demo address
 *  and its admin API's. */
function startServer(listen = "127.0.0.1:0") {
  const proc = spawn(BIN, [
    "serve", "--dev", "--jwt-secret", "browser-test-secret-of-at-least-32-bytes",
    "--listen", listen, "--admin-listen", "127.0.0.1:0",
    "--data-dir", path.join(scratch, "data"), "--log-level", "warn",
  ], { stdio: ["ignore", "pipe", "inherit"] });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("imgate printed no web demo line")), TIMEOUT);
    proc.on("exit", (code) => reject(new Error(`imgate exited with ${code}`)));
    let admin;
    readline.createInterface({ input: proc.stdout }).on("line", (line) => {
      const a = line.match(/admin API on (http:\/\/127\.0\.0\.1:\d+)/);
      if (a) admin = a[1];
      const m = line.match(/web demo at (http:\/\/127\.0\.0\.1:\d+)\//);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, url: m[1], admin });
      }
    });
  });
}

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  const s = await startServer();
  server = s.proc;
  baseUrl = s.url;
  adminUrl = s.admin;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    // playwright-core gives each launch a fresh, empty profile directory.
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    timeout: 60_000,
  });
});

after(async () => {
  await browser?.close();
  if (server && server.exitCode === null) {
    server.kill("SIGTERM");
    await new Promise((r) => server.once("exit", r));
  }
  rmSync(scratch, { recursive: true, force: true });
});

async function openAs(uid) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 640 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(baseUrl + "/");
  await page.fill("#uid", uid);
  await page.click("#login");
  await page.waitForSelector('#status[data-state="online"]');
  return { page, context, errors };
}

const friend = (page, uid) => page.locator(`#friends li[data-uid="${uid}"]`);

async function expectPresence(page, uid, online) {
  await page.waitForSelector(`#friends li[data-uid="${uid}"][data-online="${online}"]`);
}

async function sendText(page, text) {
  await page.fill("#text", text);
  await page.click("#send");
}

async function expectMessage(page, text, mine) {
  const sel = `#messages li.msg${mine ? ".mine" : ":not(.mine)"}:not(.pending)`;
  await page.locator(sel, { hasText: text }).waitFor();
}

test("two friends see each other online, chat both ways, reload keeps history, close shows offline", async () => {
  const alice = await openAs("alice");
  // alice befriends bob through the demo's dev route; bob is not online yet.
  await alice.page.fill("#friend-uid", "bob");
  await alice.page.click("#add-friend button");
  await expectPresence(alice.page, "bob", false);

  const bob = await openAs("bob");
  await expectPresence(bob.page, "alice", true);
  await expectPresence(alice.page, "bob", true);
  await alice.page.screenshot({ path: path.join(SHOTS, "1-alice-sees-bob-online.png") });

  // alice -> bob; bob has not opened the chat, so it shows as unread.
  await sendText(alice.page, "hello bob");
  await expectMessage(alice.page, "hello bob", true);
  await bob.page.waitForSelector('#friends li[data-uid="alice"] .unread:text("1")');
  await bob.page.screenshot({ path: path.join(SHOTS, "2-bob-unread.png") });

  await friend(bob.page, "alice").click();
  await expectMessage(bob.page, "hello bob", false);
  assert.equal(await friend(bob.page, "alice").locator(".unread").textContent(), "");

  // bob -> alice, and a second one each way.
  await sendText(bob.page, "hi alice");
  await expectMessage(alice.page, "hi alice", false);
  await sendText(alice.page, "how are you?");
  await sendText(bob.page, "fine, thanks");
  await expectMessage(bob.page, "how are you?", false);
  await expectMessage(alice.page, "fine, thanks", false);
  await bob.page.screenshot({ path: path.join(SHOTS, "3-bob-chat.png") });

  // bob reloads: same tab, same device; the history comes back from Sync, in order.
  await bob.page.reload();
  await bob.page.waitForSelector('#status[data-state="online"]');
  await friend(bob.page, "alice").click();
  for (const [text, mine] of [
    ["hello bob", false], ["hi alice", true], ["how are you?", false], ["fine, thanks", true],
  ]) {
    await expectMessage(bob.page, text, mine);
  }
  const texts = await bob.page.locator("#messages li.msg").evaluateAll((els) =>
    els.map((e) => e.firstChild.textContent));
  assert.deepEqual(texts, ["hello bob", "hi alice", "how are you?", "fine, thanks"]);
  await bob.page.screenshot({ path: path.join(SHOTS, "4-bob-after-reload.png") });

  // After the reload bob is still online for alice (the same device came back).
  await expectPresence(alice.page, "bob", true);

  // bob closes his page: alice sees him go offline.
  await bob.context.close();
  await expectPresence(alice.page, "bob", false);
  await friend(alice.page, "bob").click();
  await alice.page.waitForSelector("#peer-bar .presence:text('offline')");
  await alice.page.screenshot({ path: path.join(SHOTS, "5-alice-sees-bob-offline.png") });

  assert.deepEqual(alice.errors, []);
  assert.deepEqual(bob.errors, []);
  await alice.context.close();
});

test("pages reconnect by themselves after a server restart and lose nothing", async () => {
  const carol = await openAs("carol");
  await carol.page.fill("#friend-uid", "dave");
  await carol.page.click("#add-friend button");
  const dave = await openAs("dave");
  await friend(dave.page, "carol").click();
  await sendText(carol.page, "before the restart");
  await expectMessage(dave.page, "before the restart", false);

  // Stop the server; both pages notice and keep retrying.
  server.kill("SIGTERM");
  await new Promise((r) => server.once("exit", r));
  await dave.page.waitForSelector('#status[data-state="offline"]');
  await carol.page.waitForSelector('#status[data-state="offline"]');

  // carol writes while the server is down: the page keeps it and sends it after reconnecting.
  await sendText(carol.page, "while the server was down");
  await carol.page.waitForSelector("#messages li.msg.pending");

  const s = await startServer(new URL(baseUrl).host);
  server = s.proc;
  adminUrl = s.admin;
  await carol.page.waitForSelector('#status[data-state="online"]');
  await dave.page.waitForSelector('#status[data-state="online"]');
  await expectMessage(dave.page, "while the server was down", false);
  await expectMessage(carol.page, "while the server was down", true);
  await sendText(dave.page, "back again");
  await expectMessage(carol.page, "back again", false);

  // Exactly once each, in order, on both sides.
  const want = ["before the restart", "while the server was down", "back again"];
  for (const p of [carol.page, dave.page]) {
    const texts = await p.locator("#messages li.msg").evaluateAll((els) =>
      els.map((e) => e.firstChild.textContent));
    assert.deepEqual(texts, want);
  }
  await dave.page.screenshot({ path: path.join(SHOTS, "6-dave-after-restart.png") });
  await carol.context.close();
  await dave.context.close();
});

const group = (page, gid) => page.locator(`#groups li[data-group="${gid}"]`);

/** The texts of the selected conversation's bubbles, with the sender shown on others'. */
function bubbles(page) {
  return page.locator("#messages li.msg").evaluateAll((els) => els.map((e) => {
    const from = e.querySelector(".from");
    return (from ? from.textContent + ": " : "") + e.querySelector(".text").textContent;
  }));
}

test("a group chat with typing", async () => {
  const erin = await openAs("erin");
  const frank = await openAs("frank");
  const gina = await openAs("gina");

  // erin creates "crew" (the dev route adds her) and adds frank and gina by uid.
  await erin.page.fill("#group-id", "crew");
  await erin.page.click("#join-group button");
  await group(erin.page, "crew").and(erin.page.locator(".selected")).waitFor();
  for (const uid of ["frank", "gina"]) {
    await erin.page.fill("#member-uid", uid);
    await erin.page.click("#add-member button");
    await erin.page.waitForFunction(() => document.querySelector("#member-uid").value === "");
  }
  // GroupChanged reaches frank and gina, who are online.
  for (const p of [frank.page, gina.page]) await group(p, "crew").waitFor();
  await erin.page.screenshot({ path: path.join(SHOTS, "7-erin-created-crew.png") });

  // erin writes; gina has not opened the group, so it counts as unread.
  await sendText(erin.page, "hello crew");
  await expectMessage(erin.page, "hello crew", true);
  await gina.page.waitForSelector('#groups li[data-group="crew"] .unread:text("1")');
  await sendText(erin.page, "anyone there?");
  await gina.page.waitForSelector('#groups li[data-group="crew"] .unread:text("2")');
  await gina.page.screenshot({ path: path.join(SHOTS, "8-gina-group-unread.png") });

  // frank opens the group: erin's messages with her name, and a read mark goes back to erin.
  await group(frank.page, "crew").click();
  await expectMessage(frank.page, "anyone there?", false);
  assert.deepEqual(await bubbles(frank.page), ["erin: hello crew", "erin: anyone there?"]);
  await erin.page.locator("#messages li.msg.mine.read", { hasText: "anyone there?" }).waitFor();
  assert.match(await erin.page.locator("#messages li.msg.read .receipt").last().textContent(),
    /frank/);

  // frank types: erin (and gina, once she looks) see it for a few seconds.
  await frank.page.fill("#text", "yes, h");
  await erin.page.waitForSelector('#typing:text("frank is typing…")');
  await erin.page.screenshot({ path: path.join(SHOTS, "9-erin-sees-frank-typing.png") });
  await erin.page.waitForSelector('#typing:empty', { timeout: 6000 });
  await frank.page.fill("#text", "yes, here");
  await frank.page.click("#send");
  await expectMessage(erin.page, "yes, here", false);
  assert.deepEqual(await bubbles(erin.page), ["hello crew", "anyone there?", "frank: yes, here"]);

  // gina opens the group: three unread, all there with their senders; the badge clears.
  await gina.page.waitForSelector('#groups li[data-group="crew"] .unread:text("3")');
  await group(gina.page, "crew").click();
  await expectMessage(gina.page, "yes, here", false);
  assert.deepEqual(await bubbles(gina.page),
    ["erin: hello crew", "erin: anyone there?", "frank: yes, here"]);
  assert.equal(await group(gina.page, "crew").locator(".unread").textContent(), "");
  await erin.page.waitForFunction(() =>
    [...document.querySelectorAll("#messages li.msg.read .receipt")]
      .some((e) => e.textContent.includes("frank, gina")));

  // gina reloads: the group and its history come back from LoginOk and Sync.
  await gina.page.reload();
  await gina.page.waitForSelector('#status[data-state="online"]');
  await group(gina.page, "crew").click();
  await expectMessage(gina.page, "yes, here", false);
  assert.deepEqual(await bubbles(gina.page),
    ["erin: hello crew", "erin: anyone there?", "frank: yes, here"]);
  await gina.page.screenshot({ path: path.join(SHOTS, "10-gina-group-after-reload.png") });

  // The backend removes gina: her page marks the group as left and disables the composer; she
  // keeps the history, and what erin sends now does not reach her.
  const r = await fetch(adminUrl + "/v1/groups/crew/members/gina", { method: "DELETE" });
  assert.equal(r.status, 204);
  await gina.page.waitForSelector('#groups li.left[data-group="crew"][data-member="false"]');
  assert.equal(await gina.page.locator("#text").isDisabled(), true);
  assert.equal(await gina.page.locator("#send").isDisabled(), true);
  await sendText(erin.page, "gina left");
  await expectMessage(frank.page, "gina left", false);
  assert.deepEqual(await bubbles(gina.page),
    ["erin: hello crew", "erin: anyone there?", "frank: yes, here"]);
  assert.equal(await group(gina.page, "crew").locator(".unread").textContent(), "");

  for (const who of [erin, frank, gina]) {
    assert.deepEqual(who.errors, []);
    await who.context.close();
  }
});

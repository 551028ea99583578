// The job page's wallet card: a creator's own wallet through the standard EIP-1193 provider (window.ethereum:
// MetaMask, Rabby, Frame, a WalletConnect bridge). Linking is a Sign-In with Ethereum message (personal_sign);
// a deposit is two transactions the wallet shows and sends (token allowance, open_job); approving and
// rejecting are EIP-712 signatures (eth_signTypedData_v4) that the farm relays and cannot make itself.
(function () {
  "use strict";
  const card = document.getElementById("wallet");
  if (!card) return;
  const csrf = card.dataset.csrf, job = card.dataset.job, own = card.dataset.own === "1";
  const el = (id) => document.getElementById(id);
  function say(text, bad) { const m = el("wallet-msg"); m.textContent = text; m.className = bad ? "error" : ""; }
  async function call(method, url, body) {
    const r = await fetch(url, {method, credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: body === undefined ? undefined : JSON.stringify(body)});
    const data = await r.json().catch(() => ({}));
    if (!r.ok) { const e = new Error(data.detail || `the farm answered ${r.status}`); e.status = r.status; throw e; }
    return data;
  }
  function wallet() {
    if (!window.ethereum) throw new Error("No browser wallet found: install one (MetaMask, Rabby, Frame) or " +
                                         "use the CLI (farm wallet link --key-file KEY).");
    return window.ethereum;
  }
  async function account() {
    const accounts = await wallet().request({method: "eth_requestAccounts"});
    if (!accounts || !accounts.length) throw new Error("the wallet gave no account: unlock it and try again");
    return accounts[0];
  }
  async function signer(expected) {
    const from = await account();
    if (from.toLowerCase() !== expected.toLowerCase()) throw new Error(`switch your wallet to ${expected}, the wallet this job is paid from`);
    return from;
  }
  async function sameChain(chainId) {
    const have = parseInt(await wallet().request({method: "eth_chainId"}), 16);
    if (have === chainId) return;
    try {
      await wallet().request({method: "wallet_switchEthereumChain", params: [{chainId: "0x" + chainId.toString(16)}]});
    } catch (e) { throw new Error(`switch your wallet to chain ${chainId} (it is on ${have})`); }
  }
  const hex = (text) => "0x" + Array.from(new TextEncoder().encode(text)).map((b) => b.toString(16).padStart(2, "0")).join("");
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  async function receipt(hash) {
    for (let i = 0; i < 600; i++) {
      const r = await wallet().request({method: "eth_getTransactionReceipt", params: [hash]});
      if (r) { if (r.status !== "0x1") throw new Error(`transaction ${hash} failed on chain`); return r; }
      await sleep(500);
    }
    throw new Error(`transaction ${hash} is not mined yet: look it up in your wallet`);
  }
  async function show() {
    try {
      const s = await call("GET", "/wallet/state");
      el("wallet-address").textContent = s.custodial
        ? `Custodial wallet ${s.address}: ${s.token_tokens} tokens (the farm holds its key)`
        : `Your wallet ${s.own_address}: ${s.token_tokens} tokens, ${s.escrow_credit_tokens} credited in escrow`;
      if (!s.custodial) {
        if (!own) el("wallet-kind").textContent = job
          ? "This job is paid from your custodial wallet (deposited before you linked your own); your new jobs are paid from your wallet."
          : "Your own wallet is linked: your new jobs are paid from it and approved only by its signatures; the farm holds no key of it.";
        el("connect-wallet").textContent = "Link another wallet";
        const left = s.custodial_left;
        el("move-balance").hidden = !(left && (left.token !== "0" || left.escrow_credit !== "0"));
      }
    } catch (e) { say(e.message, true); }
  }
  function on(id, fn) {
    const b = el(id);
    if (!b) return;
    b.addEventListener("click", async () => {
      b.disabled = true;
      try { await fn(); } catch (e) { say(e.message || String(e), true); } finally { b.disabled = false; }
    });
  }
  on("connect-wallet", async () => {
    const address = await account();
    await sameChain((await call("GET", "/wallet/state")).chain_id);
    const c = await call("POST", "/wallet/challenge", {address});
    say("Sign the message in your wallet to link it…");
    const signature = await wallet().request({method: "personal_sign", params: [hex(c.message), address]});
    const linked = await call("POST", "/wallet/link", {message: c.message, signature});
    say(`Linked ${linked.own_address}: your new jobs are paid from it and approved only by its signatures.`);
    await show();
  });
  on("move-balance", async () => {
    const r = await call("POST", "/wallet/move", {});
    say(`Moved ${r.amount_tokens} tokens to ${r.to}.`);
    await show();
  });
  on("wallet-deposit", async () => {
    const t = await call("GET", `/jobs/${job}/wallet/deposit`);
    await sameChain(t.chain_id);
    const from = await signer(t.from);
    for (const c of t.calls || []) {
      say(`Confirm in your wallet: ${c.what}`);
      const hash = await wallet().request({method: "eth_sendTransaction", params: [{from, to: c.to, data: c.data, value: c.value}]});
      say(`Waiting for ${hash}…`);
      await receipt(hash);
    }
    say("Deposited: the job starts as soon as the farm sees it.");
  });
  on("wallet-approve", async () => {
    let a;
    for (let i = 0; ; i++) {  // the payout list reaches the chain a moment after the job is rendered
      try { a = await call("GET", `/jobs/${job}/wallet/approval`); break; }
      catch (e) { if (e.status !== 409 || i >= 60) throw e; say(e.message); await sleep(1000); }
    }
    const from = await signer(a.signer);
    say(`Sign the approval in your wallet: ${a.payouts.length} workers, round ${a.round}…`);
    const signature = await wallet().request({method: "eth_signTypedData_v4", params: [from, JSON.stringify(a.typed_data)]});
    await call("POST", `/jobs/${job}/wallet/approve`, {signature});
    window.location.reload();
  });
  if (own) {
    document.addEventListener("submit", async (ev) => {
      const f = ev.target.closest("form.reject");
      if (!f) return;
      ev.preventDefault();
      try {
        const body = {frames: f.elements.frames.value, reason: f.elements.reason.value};
        const r = await call("POST", `/jobs/${job}/wallet/rejection`, body);
        const from = await signer(r.signer);
        say("Sign the rejection in your wallet…");
        const signature = await wallet().request({method: "eth_signTypedData_v4", params: [from, JSON.stringify(r.typed_data)]});
        await call("POST", `/jobs/${job}/wallet/reject`, {...body, signature});
        window.location.reload();
      } catch (e) { say(e.message || String(e), true); }
    });
  }
  show();
})();

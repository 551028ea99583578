// Live parts of the job page: progress over server-sent events, new previews as frames finish, lightbox.
(function () {
  "use strict";
  const root = document.getElementById("job");
  const box = document.getElementById("lightbox");
  function openLightbox(src) {
    if (!box) return;
    box.querySelector("img").src = src;
    box.showModal();
  }
  document.addEventListener("click", (ev) => {
    const b = ev.target.closest(".thumb");
    if (b) openLightbox(b.dataset.full);
  });
  if (!root || !window.EventSource) return;
  const id = root.dataset.job;
  let known = new Set(JSON.parse(root.dataset.live).outputs);
  let status = JSON.parse(root.dataset.live).status;
  const es = new EventSource(`/jobs/${id}/live`);
  es.addEventListener("job", (ev) => {
    const v = JSON.parse(ev.data);
    document.getElementById("progress").value = v.progress;
    document.getElementById("frames").textContent = `${v.frames_done}/${v.frames_total}`;
    document.getElementById("counts").textContent =
      Object.entries(v.tasks).map(([k, n]) => `${k} ${n}`).join(", ");
    document.getElementById("error").textContent = v.error || "";
    const st = document.getElementById("status");
    st.textContent = v.status; st.className = `badge ${v.status}`;
    const ul = document.getElementById("running");
    ul.replaceChildren(...v.running.map((t) => {
      const li = document.createElement("li");
      li.textContent = `task ${t.index} on ${t.worker} (${t.progress[0]}/${t.progress[1]})`;
      return li;
    }));
    const gallery = document.getElementById("gallery");
    for (const name of v.outputs) {
      if (known.has(name) || name.endsWith(".mp4")) continue;
      known.add(name);
      document.getElementById("no-outputs")?.remove();
      const fig = document.createElement("figure");
      const btn = document.createElement("button");
      btn.type = "button"; btn.className = "thumb";
      btn.dataset.full = `/jobs/${id}/previews/${encodeURIComponent(name)}`;
      btn.setAttribute("aria-label", `enlarge ${name}`);
      const img = document.createElement("img");
      img.src = btn.dataset.full; img.alt = `preview of ${name}`;
      btn.appendChild(img); fig.appendChild(btn);
      const cap = document.createElement("figcaption"); cap.textContent = name; fig.appendChild(cap);
      gallery.appendChild(fig);
    }
    // review controls depend on the status: reload the page once when it changes state
    if (v.status !== status) { status = v.status; es.close(); window.location.reload(); }
  });
})();

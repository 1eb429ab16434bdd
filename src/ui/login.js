// The login page: sends the password or the key to POST /ui/login as JSON
// and goes to the dashboard once the session cookie is set. Errors are
// shown as text.

const form = document.getElementById("login-form");
const error = document.querySelector("[data-testid=login-error]");

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  error.textContent = "";
  const password = form.elements.password.value;
  const key = form.elements.key.value.trim();
  if (!password && !key) {
    error.textContent = "Enter the dashboard password or an API key.";
    return;
  }
  const body = password ? { password } : { key };
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    const resp = await fetch("/ui/login", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    if (resp.ok) {
      location.assign("/ui/");
      return;
    }
    let message = `Login failed (${resp.status}).`;
    try {
      const j = await resp.json();
      if (j && j.error && j.error.message) message = j.error.message;
    } catch (_) {
      // not JSON: keep the status line
    }
    if (resp.status === 429) {
      const after = resp.headers.get("retry-after");
      message = `Too many failed attempts; try again in ${after || "a minute"} s.`;
    }
    error.textContent = message;
  } catch (e) {
    error.textContent = `The daemon did not answer: ${e.message}`;
  } finally {
    button.disabled = false;
    form.elements.password.value = "";
  }
});

# The machine every VM test starts from: claracore with socket activation
# (the module's default) serving the tiny model on nixpkgs' CPU llama-cpp,
# and the tools the test scripts use.
{
  pkgs,
  tinyModel,
  ...
}:
let
  # cc-chat MODEL: one chat completion over TCP; prints the JSON body and
  # fails unless the answer is HTTP 200.
  cc-chat = pkgs.writeShellApplication {
    name = "cc-chat";
    runtimeInputs = [
      pkgs.curl
      pkgs.jq
    ];
    text = ''
      model="$1"
      body="$(jq -cn --arg m "$model" \
        '{model: $m, max_tokens: 8, messages: [{role: "user", content: "hi"}]}')"
      out="$(curl -sS -m 120 -w '\n%{http_code}' -H 'content-type: application/json' \
        -d "$body" http://127.0.0.1:5800/v1/chat/completions)"
      code="''${out##*$'\n'}"
      printf '%s\n' "''${out%$'\n'*}"
      if [ "$code" != 200 ]; then
        echo "cc-chat $model: HTTP $code" >&2
        exit 1
      fi
    '';
  };

  # cc-ps MODEL FIELD: a field of MODEL in GET /admin/ps (empty when absent).
  cc-ps = pkgs.writeShellApplication {
    name = "cc-ps";
    runtimeInputs = [
      pkgs.curl
      pkgs.jq
    ];
    text = ''
      curl -sSf -m 30 --unix-socket /run/claracore/claracore.sock http://x/admin/ps \
        | jq -r --arg m "$1" --arg f "$2" '.models[] | select(.name == $m) | .[$f] // empty'
    '';
  };
in
{
  services.claracore = {
    enable = true;
    models.tiny = {
      model = tinyModel;
      args = [
        "-c"
        "512"
        "-t"
        "1"
      ];
      aliases = [ "tiny-chat" ];
    };
  };

  environment.systemPackages = [
    cc-chat
    cc-ps
    pkgs.curl
    pkgs.jq
    pkgs.sqlite
  ];

  virtualisation.memorySize = 1536;
  virtualisation.cores = 2;
}

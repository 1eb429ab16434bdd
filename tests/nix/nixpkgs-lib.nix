# nixpkgs' `lib` from $NIXPKGS_LIB (a checkout of nixpkgs or nixpkgs.lib),
# made to work on older Nix (Debian's nix-bin is 2.8): lib.fileset needs
# builtins.readFileType (Nix 2.14), which readDir of the parent can stand in for.
let
  lib = import (builtins.getEnv "NIXPKGS_LIB" + "/lib");
in
if builtins ? readFileType then
  lib
else
  lib.extend (
    _: prev: {
      filesystem = prev.filesystem // {
        pathType = path: (builtins.readDir (dirOf path)).${baseNameOf path};
      };
    }
  )
